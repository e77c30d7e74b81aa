# The fleet's one image: worker (agents, ops), beat and Flower all run it with a different command
# (see docker-compose.yml). Build context is filtered by .dockerignore (an allowlist: no .env, no .git).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# git: mirrors, worktrees, commits and pushes; openssh-client: ssh:// and git@ remotes; tzdata: zoneinfo for
# ORCHESTRATOR_TIMEZONE (the slim image ships no zone files and the project does not depend on the tzdata wheel).
# Agents' quality gates run in this image too: extend it with the toolchains your repositories' gates need.
# bubblewrap: every agent command and quality gate runs inside it (CONTRACT section 6); the container needs user
# namespaces and unshare allowed (docker-compose.yml sets seccomp/apparmor for the agents service, see
# docs/sandbox.md). Debian's package, never a setuid build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client ca-certificates tzdata bubblewrap \
    && rm -rf /var/lib/apt/lists/*

# A non-root user. The state directories are created here, owned by it, so that named volumes mounted on them
# start out with that owner (Docker copies the image directory's ownership into an empty named volume).
RUN groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid orchestrator --create-home --home-dir /home/orchestrator \
       --shell /bin/bash orchestrator \
    && mkdir -p /var/lib/orchestrator/workspace /var/lib/orchestrator/beat \
    && chown -R orchestrator:orchestrator /var/lib/orchestrator

# A regular (non-editable) install; the source tree is removed afterwards so `celery -A orchestrator` can only
# import the installed package.
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

USER orchestrator
WORKDIR /var/lib/orchestrator
ENV ORCHESTRATOR_WORKSPACE_DIR=/var/lib/orchestrator/workspace

# The documented all-in-one worker; docker-compose.yml gives every service its own command.
CMD ["celery", "-A", "orchestrator", "worker", "-Q", "agents,ops"]
