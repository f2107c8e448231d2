"""The planner: GPUs (profiles and the NVML probe), the cost model, the search over setups and its
result (a Plan with the kwargs a user's script takes), the allocator recheck, several GPUs."""
