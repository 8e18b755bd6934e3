# segmap: `make test` is what CI runs (.ci/run). See README.md.

GO       ?= go
# The model test's size in `make test`: operations per seed and seeds.
MODEL_OPS   ?= 700
MODEL_SEEDS ?= 3

.PHONY: all build test deps tools verify fmt-check vet lint tidy-check proto-check packages-check protoc model bench soak fuzz run clean proto

all: build

build:
	$(GO) build -o bin/segmap ./cmd/segmap

# test: installs the NBD clients the end-to-end tests drive (if missing),
# runs 'verify', and runs every test under the race detector: unit tests,
# the model test (MODEL_SEEDS seeds x MODEL_OPS operations) and the
# end-to-end tests against a real 'segmap up' process. GORACE drops the
# second a race-built process sleeps as it exits (each test binary, each
# segmap process the end-to-end tests start and stop).
# The Debian packages (network-bound) and the build of the pinned linter
# (CPU-bound, minutes on a fresh machine) go side by side.
test:
	$(MAKE) --no-print-directory -j2 deps tools
	$(MAKE) --no-print-directory verify
	GORACE=atexit_sleep_ms=0 SEGMAP_MODEL_OPS=$(MODEL_OPS) SEGMAP_MODEL_SEEDS=$(MODEL_SEEDS) $(GO) test -race -count=1 -timeout 20m ./...

# deps: the Debian packages the tests need (qemu-utils, libnbd-bin,
# python3-libnbd, nbdkit, nbdfuse, fuse3, fio, e2fsprogs, xfsprogs), installed when missing.
deps:
	./scripts/deps.sh

# verify: the static checks, run before the tests, each failing on its own
# finding: gofmt -s, go vet, golangci-lint (.golangci.yml; pinned in go.mod's
# tool block) and the house rules (internal/lint), go.mod/go.sum tidy, and
# api/*.pb.go current with the .proto files, docs/packages.md current.
verify: fmt-check vet lint tidy-check proto-check packages-check

# tools: builds the tools pinned in go.mod's tool block into the build
# cache, so that 'go tool' finds them built.
tools:
	$(GO) tool -n golangci-lint >/dev/null

# packages-check: docs/packages.md (every package, its job, its imports)
# is what scripts/packages.sh prints for the tree as it is.
packages-check:
	@./scripts/packages.sh | diff -u docs/packages.md - || { echo "docs/packages.md is stale: run scripts/packages.sh > docs/packages.md"; exit 1; }

fmt-check:
	@out=$$(gofmt -s -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt -s needed (gofmt -s -w FILE):"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# lint: golangci-lint, then the house rules of internal/lint (a test, so
# that 'go test ./...' runs them too).
lint:
	$(GO) tool golangci-lint run ./...
	$(GO) test -count=1 ./internal/lint

# tidy-check: go mod tidy would change nothing (-diff prints the change and
# fails instead of writing it).
tidy-check:
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }

# proto-check: regenerates api/ into a temporary directory with the pinned
# generators and Debian's protoc, and fails if any generated file differs
# from the committed one (or is missing or extra).
proto-check: protoc
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(MAKE) --no-print-directory proto PROTO_OUT="$$tmp" >/dev/null && \
	for f in $$(cd "$$tmp" && find . -name '*.pb.go') $$(cd api && find . -name '*.pb.go'); do \
		f=$${f#./}; \
		diff -u "api/$$f" "$$tmp/$$f" >/dev/null || { \
			diff -u "api/$$f" "$$tmp/$$f" | head -40; \
			echo "api/$$f is stale: run make proto and commit it"; exit 1; }; \
	done

# protoc: Debian's protobuf-compiler, installed by scripts/deps.sh when missing.
protoc:
	@command -v protoc >/dev/null || ./scripts/deps.sh proto

# model: a long run of the randomized model test.
model:
	$(GO) test -count=1 -timeout 0 -run TestModel ./internal/standalone -model.ops $${OPS:-20000} -model.seeds $${SEEDS:-20}

# bench: not part of 'test' (CI does not run it). One run (bench/run.sh)
# measures side by side and writes docs/benchmarks.md, docs/bench-*.png and
# the raw results in docs/bench-raw/: fio over NBD against segmap, qemu-nbd
# and nbdkit (bench/nbd.sh), writes after a snapshot beside qcow2 overlays
# (bench/cow.sh), a snapshot every few seconds under writes
# (bench/snaploop.sh), faults beside a stopped storage node (bench/stall.sh),
# snapshot time and writer pause against allocated segments
# (bench/snapshot.sh), memory per mapped entry, the map fault round trip and
# the agent data path (go test -bench), export beside nbdcopy
# (bench/export.sh), diff and rollback time against table size (go test
# -bench), a container drain beside cp and a writer's p99 during it
# (bench/drain.sh), a mirrored disk beside a single-container one, its
# rebuild and failover (bench/mirror.sh). Environment knobs: REPS=3, RUNTIME=8
# (s per fio job), SIZE_MB=1024, COW_MB=512, RND_MB=1024, RND_S=10,
# PAR_MB=128, PAR_QD=1, SNAPLOOP_MB=2048, SNAPLOOP_S=120, SNAPLOOP_EVERY=5,
# STALL_MB=256, STALL_T=60, SIZES="1000 10000 100000 1000000" (allocated
# segments), SNAPS=20, COUNT=3, FAULT_N=2000, DATAPATH_N=40000,
# EXPORT_MB=1024, DRAIN_MB=1024, DRAIN_BEFORE=8, MIRROR_MB=1024,
# FAIL_BEFORE=3, FAIL_AFTER=8, DOC=docs/benchmarks.md,
# NOTE="...". Quick look: REPS=1 RUNTIME=2
# SIZES="1000 10000" COUNT=1 SNAPLOOP_S=20 make bench.
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

# proto: regenerate api/ from the .proto files (generated code is committed)
# with Debian's protoc and the generators pinned in go.mod's tool block;
# PROTO_OUT=dir writes elsewhere (proto-check does).
PROTO_OUT ?= api
proto: protoc
	protoc -I api \
		--plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--plugin=protoc-gen-go-grpc="$$($(GO) tool -n protoc-gen-go-grpc)" \
		--go_out=$(PROTO_OUT) --go_opt=paths=source_relative \
		--go-grpc_out=$(PROTO_OUT) --go-grpc_opt=paths=source_relative api/segmapv1/*.proto
