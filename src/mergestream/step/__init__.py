"""One merge step: a checkpoint folded into the state's next generation, wherever it runs.

- `engine`: the step itself, tensor by tensor through the method's kernel (whole tensors in
  parallel, large ones by row blocks); `runtime`: devices, kernel threads, CUDA streams.
- `backends`: where a step runs, behind one `run(request)`: this process (`local`), or tasks on
  a cluster (`tasks`: what a task is and does; `ray_backend`: tasks on Ray).
- `prepare`: the next step's decompositions computed ahead; `plan`: what a step would do, from
  headers alone; `merged_adapter`: the check for a full checkpoint that is a merged LoRA.

Below: io, methods and store. Above: the exports and the state, which commits what a step wrote.
"""
