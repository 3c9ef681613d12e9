#!/bin/sh
# One-shot: create the federation and enroll the three sites of the testbed (idempotent).
set -eu
FED=/federation
if [ ! -f "$FED/ca.key" ]; then
    p2pacs federation create --out "$FED" --name testbed
fi
enroll() {
    # $1 site name  $2 AE title  $3 extra option (a C-MOVE destination, or --no-discovery)
    if [ ! -f "/sites/$1/site/identity/site.key" ]; then
        p2pacs site enroll --federation "$FED" --name "$1" --out "/sites/$1/site" --host "$1" --aet "$2" --bootstrap lab:11190 --no-discovery $3
    fi
}
enroll lab LAB --replication=2
enroll clinic-a CLINICA --destination=ORTHANCA=orthanc-a:4242
enroll clinic-b CLINICB --destination=ORTHANCB=orthanc-b:4242
chown -R 10001:10001 /sites  # the site containers run as the unprivileged p2pacs user
