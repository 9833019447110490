# The README's commands. Everything that needs packages installs them first (scripts/deps.sh).
CARGO ?= cargo
BIN := target/release/podshaper

.PHONY: deps build demo test bench fmt lint clean

deps:
	./scripts/deps.sh

build: deps
	$(CARGO) build --release --locked

## The main job: a demo on this machine, no cluster (root).
demo: build
	$(BIN) demo

## Unit tests, then the privileged tests (root; skipped with a message otherwise, failed under CI=true).
test: deps
	$(CARGO) test --workspace --locked

## Benchmark against TBF as the bandwidth CNI plugin sets it up (root, ~20 min; `BENCH_ARGS=--quick`).
bench: deps
	$(CARGO) run --release --locked -p podshaper-testbed --bin podshaper-bench -- --markdown docs/benchmarks.md $(BENCH_ARGS)

fmt:
	$(CARGO) fmt --all
	clang-format -i podshaper-ebpf/bpf/*.c podshaper-ebpf/bpf/*.h

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	clang-format --dry-run --Werror podshaper-ebpf/bpf/*.c podshaper-ebpf/bpf/*.h

clean:
	$(CARGO) clean
