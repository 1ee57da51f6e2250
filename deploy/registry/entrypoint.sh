#!/bin/sh
set -eu
sed -e "s/@HOST@/$REGISTRY_HOST/" -e "s/@PORT@/$REGISTRY_PORT/" \
    -e "s#@DATA@#/var/lib/tributary-registry#" \
    /opt/tributary-registry/registry.yml > /tmp/registry.yml
exec docker-registry serve /tmp/registry.yml
