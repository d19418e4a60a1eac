#!/bin/sh
# idle: the operating system alone, for the study's baseline.
sleep "${VMSYNC_DURATION:-60}"
echo "vmsync-workload: done"
