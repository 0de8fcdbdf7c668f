"""How a run is spread over processes: the seam the trainer talks to (seam.py: SingleProcess, FSDP2),
torchrun process groups and FSDP2 sharding (distributed.py), the multi-process launcher (launch.py)
and the GPU memory plan (memory_plan.py)."""
