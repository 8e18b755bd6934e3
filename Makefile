# segmap: `make test` is what CI runs (.ci/run). See README.md.

GO       ?= go
# The model test's size in `make test`: operations per seed and seeds.
MODEL_OPS   ?= 700
MODEL_SEEDS ?= 3

.PHONY: all build test deps vet fmt-check model bench soak fuzz run clean proto

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
	$(GO) test -count=1 -timeout 0 -run TestModel ./internal/standalone -model.ops $${OPS:-20000} -model.seeds $${SEEDS:-20}

# bench: not part of 'test' (CI does not run it). One run (bench/run.sh)
# measures side by side and writes docs/benchmarks.md, docs/bench-*.png and
# the raw results in docs/bench-raw/: fio over NBD against segmap, qemu-nbd
# and nbdkit (bench/nbd.sh), the first write after a snapshot beside a qcow2
# overlay (bench/cow.sh), snapshot time and writer pause against allocated
# segments (bench/snapshot.sh), memory per mapped entry, the map fault round
# trip and the agent data path (go test -bench). Environment knobs: REPS=3,
# RUNTIME=8 (s per fio job), SIZE_MB=1024, COW_MB=512,
# SIZES="1000 10000 100000 1000000" (allocated segments), SNAPS=3, COUNT=3,
# FAULT_N=2000, DATAPATH_N=40000, DOC=docs/benchmarks.md, NOTE="...".
# Quick look: REPS=1 RUNTIME=2 SIZES="1000 10000" COUNT=1 make bench.
bench:
	./bench/run.sh

# soak: the reliability tests (crash points, error injection, kill storms,
# linearizability, the model test) in their long form and every fuzz target, for DURATION
# in all (a Go duration, shared out between the seven parts; at least 7m):
#   make soak DURATION=2h
# Summary counts and any failure's seed go to soak-<time>.log.
DURATION ?= 30m
soak: deps
	./scripts/soak.sh $(DURATION)

# fuzz: every fuzz target for FUZZTIME each (default 10m), one after
# another; new interesting inputs are kept as seeds in testdata/fuzz.
FUZZTIME ?= 10m
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

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
