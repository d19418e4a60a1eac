# vmsync: the commands people type.
#
#   make demo    install what is needed, build, and move a live VM between two devices
#   make test    install what is needed, build, and run every test
#   make module  build vmsync.ko against kernel headers (KDIR=...)
#   make deb     build the Debian packages vmsync and vmsync-dkms into build/deb

BUILD      ?= build
IMAGE      ?= $(BUILD)/vm-images/counter
VIDEO_IMAGE ?= $(BUILD)/vm-images/video
JOBS       ?= $(shell nproc)
KVER       ?= $(shell ls -1 /usr/src 2>/dev/null | sed -n 's/^linux-headers-\(.*-amd64\)$$/\1/p' | sort -V | tail -n 1)
KDIR       ?= /usr/src/linux-headers-$(KVER)

# Debian packages the project builds and runs with.
PACKAGES := build-essential cmake ninja-build pkg-config \
  capnproto libcapnp-dev liblz4-dev libzstd-dev liburing-dev libbpf-dev bpftool clang llvm \
  libgtest-dev libgmock-dev libbenchmark-dev libxxhash-dev nlohmann-json3-dev libcli11-dev \
  libspdlog-dev libfmt-dev libssl-dev libfuse3-dev prometheus-cpp-dev \
  qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio kmod xz-utils zstd \
  linux-image-amd64 linux-headers-amd64 iproute2 xfsprogs btrfs-progs gnuplot-nox ffmpeg sqlite3 libclang-rt-14-dev

.PHONY: all setup build image video-image demo test soak chaos powercut sanitize sanitize-build sanitize-run fuzz fuzz-build fuzz-run fuzz-long module bench bench-kmod bench-switch bench-server bench-adaptive study clean

all: build

# Installs only what is missing, so a second run does nothing.
setup:
	@missing=$$(for p in $(PACKAGES) $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "setup: every package is installed"; fi

build: setup
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(BUILD) -j $(JOBS)

image: setup
	vm-images/build.sh --out $(IMAGE) --workload counter

# The paper's video workload: the study and the adaptive-interval bench run on it.
video-image: setup
	vm-images/build.sh --out $(VIDEO_IMAGE) --workload video

demo: build image
	tests/integration/demo.sh $(BUILD) $(IMAGE)

# The Debian packages vmsync and vmsync-dkms (dpkg-buildpackage, on a copy of
# the checkout's tracked files) into $(BUILD)/deb; see docs/packaging.md.
# `make setup` installs what it needs beside PACKAGES: DEB_PACKAGES, which
# also has what the package test uses (man: `systemd-analyze verify` looks up
# the units' Documentation=).
DEB_PACKAGES := dpkg-dev debhelper dh-dkms dkms fakeroot help2man man-db systemd
.PHONY: deb
deb: setup
	packaging/build-deb.sh $(BUILD)/deb $(JOBS)

# ctest on the main build, then the sanitizer and fuzzer steps, whose trees
# compile beside ctest at the lowest CPU priority (tests/run_all.sh).
test: build image
	MAKE=$(MAKE) tests/run_all.sh $(abspath $(BUILD)) $(abspath $(IMAGE)) 5

# The long schedule of the failover test: 20 seeded kill -9 moments of the
# active device (make test runs 3).
SOAK_SEEDS ?= 20
soak: build image
	VMSYNC_IMAGE=$(abspath $(IMAGE)) VMSYNC_FAILOVER_SEEDS=$(SOAK_SEEDS) \
	  $(BUILD)/tests/integration/vmsync_failover_tests --gtest_brief=1

# The chaos harness (docs/operations.md, "Chaos"): the server and three
# devices in network namespaces, a seeded schedule of switches, link cuts
# and flaps, kill -9 of the server and the devices, link profile changes,
# and checkers for durability, a single running VM, convergence and the
# guest's continuity. SEED takes a list (1,2,3); `make test` runs 16 steps
# of seed 1 and the schedules of tests/chaos/regression-seeds.txt.
SEED  ?= 1
STEPS ?= 200
chaos: build image
	VMSYNC_IMAGE=$(abspath $(IMAGE)) $(BUILD)/tests/chaos/vmsync_chaos --seeds $(SEED) --steps $(STEPS) \
	  --out $(BUILD)/chaos

# Power cuts (docs/operations.md, "Power cuts"): the server's data directory
# and a standby's state directory on the power-cut file system
# (tests/powercut), cut at every crash point of a push and at POWER_CUTS
# random moments each (`make test` cuts at 3).
POWER_CUTS ?= 20
powercut: build image
	$(BUILD)/tests/powercut/vmsync_powercut_tests --gtest_brief=1
	VMSYNC_IMAGE=$(abspath $(IMAGE)) VMSYNC_POWER_CUTS=$(POWER_CUTS) \
	  $(BUILD)/tests/integration/vmsync_durability_tests --gtest_brief=1 --gtest_filter='*PowerCut*'

# Unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer.
sanitize: sanitize-build
	$(MAKE) --no-print-directory sanitize-run

sanitize-build: setup
	cmake -S . -B $(BUILD)/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DVMSYNC_SANITIZE=ON >/dev/null
	cmake --build $(BUILD)/asan -j $(JOBS) --target vmsync_unit_tests

sanitize-run:
	for t in $(BUILD)/asan/tests/unit/vmsync_*_tests; do echo "$$t"; $$t --gtest_brief=1 || exit 1; done

# libFuzzer targets (clang) on the decoders, checkpoint handling, the server's
# and the device's recovery from their directories, and the RPC path (see
# docs/security.md, "Fuzzing"). `make fuzz`: FUZZ_SECONDS each (default 60),
# from the committed corpora, which it leaves as they are. `make fuzz-long`:
# FUZZ_SECONDS each (default 600), growing the committed corpora, then
# minimizing them. FUZZ_TARGETS picks targets (default: all).
fuzz-build: setup
	cmake -S tests/fuzz -B $(BUILD)/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ >/dev/null
	cmake --build $(BUILD)/fuzz -j $(JOBS)

fuzz: fuzz-build
	$(MAKE) --no-print-directory fuzz-run

fuzz-run:
	tests/fuzz/run.sh $(BUILD)/fuzz $(or $(FUZZ_SECONDS),60) $(FUZZ_TARGETS)

fuzz-long: fuzz-build
	tests/fuzz/run.sh --grow $(BUILD)/fuzz $(or $(FUZZ_SECONDS),600) $(FUZZ_TARGETS)

module:
	$(MAKE) -C $(KDIR) M=$(CURDIR) modules

bench: build
	$(BUILD)/bench/vmsync_bench --benchmark_out=$(BUILD)/bench.json --benchmark_out_format=json
	$(BUILD)/bench/vmsync_fanout_bench --benchmark_out=$(BUILD)/bench-fanout.json --benchmark_out_format=json
	$(BUILD)/bench/vmsync_bench_summary $(BUILD)/bench.json --fanout $(BUILD)/bench-fanout.json
	$(BUILD)/bench/bpf_harvest_bench --benchmark_out=$(BUILD)/bench-bpf.json --benchmark_out_format=json

# Harvest cost per round, kmod against scan; needs vmsync.ko, so it runs in
# Debian's kernel under QEMU TCG (timings of an emulated CPU).
bench-kmod: setup
	tests/kmod/run_kmod_test.sh --bench

# Switch latency over emulated wifi and lte links next to QEMU's live
# migration (root: network namespaces; see README: Switch benchmark).
bench-switch: build image
	$(BUILD)/userspace/vmsync bench switch --profile wifi,lte --runs 5 --image $(IMAGE) --out $(BUILD)/bench-switch

# The server under many VMs, without QEMU (see docs/benchmarks.md: Server under
# load): a sweep of VM counts, 60 s each, until p99 push latency passes 1 s;
# then 10 minutes of 100 VMs x 3 devices; then 100 VMs again beside one
# 512 MiB VM of random bytes, without folds and with that VM alone folding.
bench-server: build
	$(BUILD)/userspace/vmsync --log-level warn bench server --vms 25,50,100,150,200,300,400 --devices 3 \
	  --seconds 60 --dir $(BUILD)/bench-server --json $(BUILD)/bench-server/sweep.json
	$(BUILD)/userspace/vmsync --log-level warn bench server --vms 100 --devices 3 --seconds 600 \
	  --dir $(BUILD)/bench-server --json $(BUILD)/bench-server/ten-minutes.json
	$(BUILD)/userspace/vmsync --log-level warn bench server --vms 100 --devices 3 --seconds 60 \
	  --compact-after 0 --compact-above-mb 0 --large-vm-mb 512 --large-vm-checkpoint-kib 4096 \
	  --dir $(BUILD)/bench-server --json $(BUILD)/bench-server/no-fold.json
	$(BUILD)/userspace/vmsync --log-level warn bench server --vms 100 --devices 3 --seconds 60 \
	  --compact-after 0 --compact-above-mb 32 --large-vm-mb 512 --large-vm-checkpoint-kib 4096 \
	  --dir $(BUILD)/bench-server --json $(BUILD)/bench-server/one-folding.json

# The adaptive interval on the video guest over wifi and lte, a target of 4 s
# (see docs/benchmarks.md: Adaptive interval).
bench-adaptive: build video-image
	$(BUILD)/userspace/vmsync bench switch --profile wifi,lte --runs 1 --target-switch-ms 4000 \
	  --initial-sync-profile lan --settle 10 --no-qemu-migration --image $(VIDEO_IMAGE) --out $(BUILD)/bench-adaptive

# The paper's study on the video workload (see README: Study).
study: build video-image
	$(BUILD)/userspace/vmsync study --workload video --image $(VIDEO_IMAGE) \
	  --duration 120 --intervals 1,2,5,10,30,60 --repeat 3 --out $(BUILD)/study-video

clean:
	rm -rf $(BUILD)
	-$(MAKE) -C $(KDIR) M=$(CURDIR) clean 2>/dev/null
