# The lab cluster's backend web server: Debian's nginx on the lab's base image
# (no registry is reachable). Its configuration comes from a ConfigMap.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["nginx", "-g", "daemon off;"]
