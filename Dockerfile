# The gpupool operator image. Build from the repository root:
#   docker build -t registry.example.com/gpupool:0.1.0 .
# Two stages: compile with the pinned toolchain and Cargo.lock, then copy the one binary into
# a distroless image that has glibc, CA certificates and a non-root user, and nothing else.

FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other members (simulator, benchmarks, tests) must be present for Cargo to
# load the workspace; only the operator is built.
COPY crates ./crates
RUN cargo build --release --locked -p gpupool --bin gpupool

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/gpupool /usr/local/bin/gpupool
# 65532:65532, the image's "nonroot"; the chart also sets runAsNonRoot and runAsUser.
USER nonroot:nonroot
# /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gpupool"]
