"""Two-GPU smoke check of the slim Ray: python .raypack/smoke.py [ADDRESS] (no ADDRESS: a local Ray).
RAYPACK_LOGICAL_GPUS=N fakes N GPUs (for a GPU-less machine)."""

import os
import sys
import time

import ray

logical = os.environ.get("RAYPACK_LOGICAL_GPUS")
if len(sys.argv) > 1:
    ray.init(address=sys.argv[1], log_to_driver=False)
else:
    ray.init(num_gpus=int(logical) if logical else None, include_dashboard=False, log_to_driver=False)
print("ray", ray.__version__, "from", ray.__file__, "| cluster", ray.cluster_resources())


@ray.remote(num_gpus=1)
class Probe:
    def where(self):
        name = None
        if not logical:
            try:
                import torch

                name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
            except ImportError:
                name = "torch missing"
        return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), name

    def sleep(self, s):
        time.sleep(s)


probes = [Probe.remote() for _ in range(2)]
got = ray.get([p.where.remote() for p in probes], timeout=120)
for ids, cvd, name in got:
    print(f"actor: ray.get_gpu_ids()={ids} CUDA_VISIBLE_DEVICES={cvd} device={name}")
assert len({str(g[0]) for g in got}) == 2, f"actors share a GPU: {got}"
ref = probes[0].sleep.remote(60)
ray.kill(probes[0], no_restart=True)
try:
    ray.get(ref, timeout=30)
    raise SystemExit("ray.kill did not end the call")
except ray.exceptions.RayActorError:
    pass


@ray.remote(num_cpus=0)
def slow():
    time.sleep(60)


r = slow.remote()
time.sleep(1)
ray.cancel(r, force=True)
try:
    ray.get(r, timeout=30)
    raise SystemExit("ray.cancel did not end the task")
except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError):
    pass
ray.shutdown()
print("RAYPACK SMOKE OK")
