# Benchmarks of the bpf block source; include()d from the build that defines
# vmsync_core (bench/CMakeLists.txt, or tests/bpf/standalone).
add_executable(bpf_harvest_bench ${CMAKE_CURRENT_LIST_DIR}/bpf_harvest_bench.cc)
target_link_libraries(bpf_harvest_bench PRIVATE vmsync_core PkgConfig::XXHASH
  benchmark::benchmark benchmark::benchmark_main)
