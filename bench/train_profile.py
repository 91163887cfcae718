"""Where a Lightning training step's time goes: host (Python, kernel launches) or GPU.

Runs `train.py`'s own `vseg.training.run.run` with the given overrides plus one callback that profiles training
steps `--first`..`--last` (torch.profiler, CPU + CUDA) and prints, per step, the wall time and the time
the GPU spent in kernels, then the heaviest operators by GPU and by host time. A GPU time well below the
wall time means the step is bound by the host, and a faster GPU kernel would not shorten it.

    python bench/train_profile.py model=sa2va_4b trainer=gpu strategy=single data=synthetic data.batch_size=8 \
        model.gradient_checkpointing=true trainer.max_steps=14 ++model.init_device=cuda
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=10, help="first profiled batch index (after warm-up)")
    parser.add_argument("--last", type=int, default=12)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--trace", default=None, help="also write the profiled steps' Chrome trace here (.json.gz)")
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="print the Python stack of every host-device synchronisation in the profiled steps "
        "(torch.cuda.set_sync_debug_mode), once per distinct stack",
    )
    args, overrides = parser.parse_known_args()

    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    import vseg.training.run as train
    from vseg.config import compose

    seen_stacks: set[str] = set()

    def show_sync(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        stack = "".join(traceback.format_stack(limit=14)[:-1])
        if stack not in seen_stacks:
            seen_stacks.add(stack)
            print(f"--- host sync #{len(seen_stacks)}: {message}\n{stack}", flush=True)

    shown = warnings.showwarning

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepProfile(L.Callback):
        prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.first:
                sync()
                self.start = time.perf_counter()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                if args.sync_debug:  # every occurrence, shown by `show_sync`, until the last profiled step
                    self.filters = warnings.filters[:]
                    warnings.simplefilter("always")
                    warnings.showwarning = show_sync
                    torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx != args.last or self.prof is None:
                return
            if args.sync_debug:
                torch.cuda.set_sync_debug_mode("default")
                warnings.filters[:] = self.filters  # the run's own warnings as before
                warnings.showwarning = shown
                print(f"{len(seen_stacks)} distinct synchronising stacks in the profiled steps", flush=True)
            sync()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            steps = args.last - args.first + 1
            events = self.prof.key_averages()
            gpu = sum(  # kernels only: DDP's forward range is a GPU-side annotation, not work
                e.self_device_time_total
                for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            )
            print(
                f"steps {args.first}..{args.last}: wall {wall / steps * 1e3:.0f} ms per step (profiled), "
                f"GPU kernels {gpu / steps / 1e3:.0f} ms per step",
                flush=True,
            )
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
            if args.trace:  # host ranges and kernels on one time line: where the GPU waits for the host
                self.prof.export_chrome_trace(args.trace)

    build = train.build_trainer

    def build_with_profile(*args):
        trainer = build(*args)
        trainer.callbacks.append(StepProfile())
        return trainer

    train.build_trainer = build_with_profile
    train.run(compose("train", overrides))


if __name__ == "__main__":
    main()
