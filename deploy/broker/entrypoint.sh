#!/bin/sh
# Render the broker configuration for this container's host and port, then run ActiveMQ in
# the foreground (its data stays in the volume, so persistent messages survive restarts).
set -eu
BASE=/var/lib/tributary-broker
mkdir -p "$BASE/conf" "$BASE/data"
sed -e "s/@HOST@/$BROKER_HOST/" -e "s/@PORT@/$BROKER_PORT/" \
    /opt/tributary-broker/activemq.xml > "$BASE/conf/activemq.xml"
cp /opt/tributary-broker/log4j2.properties "$BASE/conf/"
exec java -Xms64M -Xmx256M -Djava.awt.headless=true \
    -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$BASE" \
    -Dactivemq.conf="$BASE/conf" -Dactivemq.data="$BASE/data" \
    -Dlog4j2.configurationFile="$BASE/conf/log4j2.properties" \
    -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$BASE/conf/activemq.xml"
