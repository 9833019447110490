# The node agent image: one static binary and nothing else (no shell, no libc, no CA bundle; the
# API server's CA comes with the service account token). Build from the repository root:
#   docker build -t ghcr.io/podshaper/podshaper:0.1.0 .

FROM rust:1.95-bookworm AS builder
# clang compiles the BPF programs (podshaper-ebpf/build.rs); libbpf-dev and linux-libc-dev give it
# bpf_helpers.h and the UAPI headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Static glibc, so the final stage can be scratch. The explicit --target keeps RUSTFLAGS off build
# scripts and proc macros, which must stay dynamic (a proc macro is a shared library). Static
# glibc cannot load NSS modules; the agent reaches the API server by IP (KUBERNETES_SERVICE_HOST),
# so it never resolves a name. The cache mounts keep the binary out of a layer: copy it out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked -p podshaper --target "$target" \
 && cp "target/$target/release/podshaper" /podshaper

FROM scratch
LABEL org.opencontainers.image.source="https://github.com/podshaper/podshaper" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /podshaper /podshaper
# Root, said explicitly: loading BPF, pinning in the host's bpffs and serving the root-only CLI
# socket need it. The chart then narrows root to a few capabilities (and runs its uninstall Job,
# which only talks to the API server, as nobody).
USER 0
ENTRYPOINT ["/podshaper"]
CMD ["agent"]
