# The orchestrator image: `orchestrator serve` by default, `orchestrator agent` as the agent's command.
#
#   docker build -t orchestrator .                      compiles in the Rust image (stage `build`)
#   docker build --target prebuilt --build-arg BINARY=target/release/orchestrator -t orchestrator .
#                                                       copies a binary built outside (glibc >= 2.34)
#
# Build arguments: BASE (runtime base image, a Debian bookworm or newer), RUST_IMAGE (build stage),
# BINARY (the prebuilt binary, relative to the build context). The runtime runs as uid/gid 10001 in
# /var/lib/orchestrator (the SQLite database and its key file when ORCH_DATABASE_URL is unset, agent
# workspaces): mount a volume there to keep them. No VOLUME is declared, so no anonymous volume is left
# behind by short-lived containers (`orchestrator seed`, the CLI).

ARG BASE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p orchestrator \
    && install -m 0755 target/release/orchestrator /usr/local/bin/orchestrator

FROM ${BASE} AS runtime-base
ARG DEBIAN_FRONTEND=noninteractive
# Agents run git (clone, worktrees, commit, push), over HTTPS or SSH.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 orchestrator \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/orchestrator --create-home \
        --shell /usr/sbin/nologin orchestrator \
    && chmod 0750 /var/lib/orchestrator
WORKDIR /var/lib/orchestrator
# Without ORCH_API_TOKENS the server refuses this non-loopback address (and says how to set tokens).
ENV ORCH_BIND=0.0.0.0:18080 \
    HOME=/var/lib/orchestrator
EXPOSE 18080
# Liveness over plain HTTP with bash's /dev/tcp (no curl in the image); the port comes from ORCH_BIND.
# An agent container has nothing listening: turn the check off there (compose: healthcheck.disable).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "p=${ORCH_BIND##*:}; exec 3<>/dev/tcp/127.0.0.1/${p:-18080} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
USER 10001:10001
ENTRYPOINT ["orchestrator"]
CMD ["serve"]

# A binary built outside the image (e.g. `cargo build --release -p orchestrator`).
FROM runtime-base AS prebuilt
ARG BINARY=target/release/orchestrator
COPY ${BINARY} /usr/local/bin/orchestrator

# The default target: the binary compiled in the build stage.
FROM runtime-base AS runtime
COPY --from=build /usr/local/bin/orchestrator /usr/local/bin/orchestrator
