# The README's commands. Everything that needs packages installs them first (scripts/deps.sh).
CARGO ?= cargo
BIN := target/release/podshaper

.PHONY: deps k8s-bins guest-kernels build demo test test-kernels bench bench-k8s bench-guest bench-policy-scale fmt lint clean

deps:
	./scripts/deps.sh

## kube-apiserver, etcd and helm from their Go modules, cached in /var/cache/podshaper (~6 min cold).
k8s-bins:
	./scripts/k8s-bins.sh

## Debian's 6.1 and 6.12 cloud kernels for the qemu guest lab, cached in /var/cache/podshaper (root).
guest-kernels:
	./scripts/guest-kernels.sh

build: deps
	$(CARGO) build --release --locked

## The main job: a demo on this machine, no cluster (root).
demo: build
	$(BIN) demo

## Unit tests, the privileged tests and the Kubernetes tests against a real kube-apiserver (root;
## skipped with a message otherwise, failed under CI=true).
test: deps k8s-bins
	$(CARGO) test --workspace --locked

## The privileged tests inside qemu guests of Debian's 6.1 and 6.12 kernels, one at a time, and a
## table of the results (root, ~10 min; `TEST_KERNELS_ARGS="--kernel 6.1 <filter>"`).
test-kernels: deps guest-kernels
	$(CARGO) run --locked -p podshaper-testbed --bin podshaper-test-kernels -- $(TEST_KERNELS_ARGS)

## Benchmark against TBF as the bandwidth CNI plugin sets it up (root, ~20 min; `BENCH_ARGS=--quick`).
bench: deps
	$(CARGO) run --release --locked -p podshaper-testbed --bin podshaper-bench -- --markdown docs/benchmarks.md $(BENCH_ARGS)

## podshaper beside an EDT + fq shaper (Cilium's kind) inside qemu guests, which have sch_fq (root, ~3 min).
bench-guest: deps guest-kernels
	$(CARGO) run --locked -p podshaper-testbed --bin podshaper-bench-guest -- $(BENCH_ARGS)

## The agent against a real kube-apiserver: change latency, RSS/CPU with 110 pods, restart (root).
bench-k8s: deps k8s-bins build
	$(CARGO) run --release --locked -p podshaper-testbed --bin podshaper-bench-k8s -- --agent $(BIN) --markdown docs/benchmarks.md $(BENCH_ARGS)

## BandwidthPolicies with 10k pod objects in a real kube-apiserver: the controller's and agent's
## memory, policy and label change to enforcement, bytes during churn (root, ~2 min).
bench-policy-scale: deps k8s-bins build
	$(CARGO) run --release --locked -p podshaper-testbed --bin podshaper-bench-policy-scale -- --podshaper $(BIN) --markdown docs/policy-scale.md $(BENCH_ARGS)

fmt:
	$(CARGO) fmt --all
	clang-format -i podshaper-ebpf/bpf/*.c podshaper-ebpf/bpf/*.h podshaper-testbed/bpf/*.c

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	clang-format --dry-run --Werror podshaper-ebpf/bpf/*.c podshaper-ebpf/bpf/*.h podshaper-testbed/bpf/*.c

clean:
	$(CARGO) clean
