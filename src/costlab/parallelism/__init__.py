"""The ``parallelism`` group: degrees, a device mesh, and one recipe that applies them.

    dims.py        the degrees dp_replicate × dp_shard × tp × pp = world size (torch-free: the launcher checks them)
    core.py        DistEnv, init_distributed; Parallel (the model as one rank trains it), ShardedParallel (DTensor)
    ddp.py         dp_replicate: DistributedDataParallel                   (option ddp)
    fsdp.py        dp_shard: FSDP2 fully_shard                               (option fsdp; fsdp_tp with tp;
                   with dp_replicate: HSDP, option hsdp)
    tp.py          tp_degree: the tensor-parallel plan                       (option tp; fsdp_tp with fsdp)
    pp.py          pp_degree: PipelineParallel, stages and schedules         (option pp; with fsdp/tp: 3-D)
    techniques.py  float8, activation checkpointing, compile
    apply.py       the recipe that applies them to a model or a pipeline stage
    parallelize.py parallelize(model, cfg, env): the degrees read, the mesh built, the recipe applied

The options only set degrees; :func:`costlab.parallelism.parallelize.parallelize` reads them, in torchtitan's order:
float8 → tensor parallel → activation checkpointing → compile → FSDP / DDP.
"""
