# segmap: `make test` is what CI runs (.ci/run). See README.md.

GO       ?= go
# The model test's size in `make test`: operations per seed and seeds.
MODEL_OPS   ?= 700
MODEL_SEEDS ?= 3

.PHONY: all build test vet fmt-check model bench run clean proto

all: build

build:
	$(GO) build -o bin/segmap ./cmd/segmap

# test: formatting, vet, and every test under the race detector, the model
# test included (MODEL_SEEDS seeds x MODEL_OPS operations).
test: fmt-check vet
	SEGMAP_MODEL_OPS=$(MODEL_OPS) SEGMAP_MODEL_SEEDS=$(MODEL_SEEDS) $(GO) test -race -count=1 -timeout 20m ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# model: a long run of the randomized model test.
model:
	$(GO) test -count=1 -timeout 0 -run TestModel ./internal/local -model.ops $${OPS:-20000} -model.seeds $${SEEDS:-20}

# bench: the in-process data path against direct file I/O.
bench:
	$(GO) test -run XXX -bench . -benchtime $${BENCHTIME:-2s} -count $${COUNT:-3} ./internal/agent ./internal/container

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
