# segmap: `make test` is what CI runs (.ci/run). See README.md.

GO       ?= go
# The model test's size in `make test`: operations per seed and seeds.
MODEL_OPS   ?= 700
MODEL_SEEDS ?= 3

.PHONY: all build test deps vet fmt-check model bench run clean proto

all: build

build:
	$(GO) build -o bin/segmap ./cmd/segmap

# test: installs the NBD clients the end-to-end tests drive (if missing),
# checks formatting and vet, and runs every test under the race detector:
# unit tests, the model test (MODEL_SEEDS seeds x MODEL_OPS operations) and
# the end-to-end tests against a real 'segmap up' process.
test: deps fmt-check vet
	SEGMAP_MODEL_OPS=$(MODEL_OPS) SEGMAP_MODEL_SEEDS=$(MODEL_SEEDS) $(GO) test -race -count=1 -timeout 20m ./...

# deps: the Debian packages the tests need (qemu-utils, libnbd-bin,
# python3-libnbd, nbdkit, nbdfuse, fuse3, fio, e2fsprogs), installed when missing.
deps:
	./scripts/deps.sh

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# model: a long run of the randomized model test.
model:
	$(GO) test -count=1 -timeout 0 -run TestModel ./internal/local -model.ops $${OPS:-20000} -model.seeds $${SEEDS:-20}

# bench: fio over NBD against segmap, qemu-nbd and nbdkit side by side
# (bench/nbd.sh; REPS, RUNTIME), then the in-process data path against
# direct file I/O (go test -bench).
bench:
	./bench/nbd.sh
	$(GO) test -run XXX -bench . -benchtime $${BENCHTIME:-2s} -count $${COUNT:-3} ./internal/agent ./internal/container ./internal/nbd ./internal/remote

run: build
	./bin/segmap up

clean:
	rm -rf bin

# proto: regenerate api/ from the .proto files (generated code is committed).
PROTOC_GEN_GO_VERSION      = v1.36.12
PROTOC_GEN_GO_GRPC_VERSION = v1.6.2
GOBIN ?= $(shell $(GO) env GOPATH)/bin
proto:
	@command -v protoc >/dev/null || (apt-get update -qq && apt-get install -y -qq protobuf-compiler)
	GOBIN=$(GOBIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(GOBIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	PATH=$(GOBIN):$$PATH protoc -I api --go_out=api --go_opt=paths=source_relative \
		--go-grpc_out=api --go-grpc_opt=paths=source_relative api/segmapv1/*.proto
