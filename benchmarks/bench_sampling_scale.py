"""`ddim-plus evaluate` at scale: peak memory as N grows, and images per second for 1 and 2 processes.

    python benchmarks/bench_sampling_scale.py --model /tmp/scale_demo

1. Memory: `evaluate` (1 process) with N = 1,000 and N = 10,000, no images returned, PNGs written with
   `--save-images`; the peak resident memory of the process (`ru_maxrss`) for each N and their ratio. The peer is
   what holding every image would add: N x H x W x C float32 bytes.
2. Throughput: the same `evaluate` with N = `--throughput-num` images, once in 1 process and once launched with
   `accelerate launch --multi_gpu --num_processes 2` (CPU processes over gloo), each process with one thread;
   images per second of the whole command inside the processes (model loading included, launcher start-up not)
   and the scaling efficiency (2-process rate / 1-process rate / 2). The two alternate `--repeats` times, and the
   median ratio is reported beside each repeat's. Every run must give the same Frechet distance.

Every run is a fresh process with `OMP_NUM_THREADS=1`.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(argv) -> None:
    """Run `ddim-plus` in this process and print its wall time and peak memory as one JSON line per process."""
    from ddim_plus.cli import main
    from ddim_plus.evaluation.sampling import process_state

    state = process_state()
    state.wait_for_everyone()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    code = main(argv)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    record = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": after.ru_maxrss / 1024}
    print("BENCH " + json.dumps(record))
    sys.exit(code)


def run(evaluate_args, num_processes, port=29851) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
    script = [os.path.abspath(__file__), "--worker", *evaluate_args]
    if num_processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *script,
        ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    records = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    with open(evaluate_args[evaluate_args.index("--out") + 1], encoding="utf-8") as file:
        (cell,) = json.load(file)
    return {
        "seconds": max(r["seconds"] for r in records),
        "cpu_seconds": sum(r["cpu_seconds"] for r in records),
        "peak_mib": max(r["peak_mib"] for r in records),
        "frechet_distance": cell["frechet_distance"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a digits pipeline folder")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps S (few: the point is the plumbing)")
    parser.add_argument("--nums", type=int, nargs="+", default=[1000, 10000], help="N of the memory runs")
    parser.add_argument("--throughput-num", type=int, default=2000, help="N of the throughput runs")
    parser.add_argument("--batch-size", type=int, default=250, help="images per model call")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per process count")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput runs")
    args = parser.parse_args()

    from ddim_plus import DDIMPlusPipeline

    config = DDIMPlusPipeline.from_pretrained(args.model).unet.config
    image_bytes = config.sample_size**2 * config.in_channels * 4
    common = ["evaluate", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--quiet"]
    print(f"load average before: {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs\n")

    if not args.skip_memory:
        print("| N | peak RSS (MiB) | seconds | all N images as float32 would be (MiB) |")
        print("|---|---|---|---|")
    peaks = []
    with tempfile.TemporaryDirectory() as folder:
        for num in [] if args.skip_memory else args.nums:
            out = os.path.join(folder, f"r{num}.json")
            images = os.path.join(folder, f"images{num}")
            result = run([*common, "--num", str(num), "--save-images", images, "--out", out], 1)
            peaks.append(result["peak_mib"])
            held = num * image_bytes / 2**20
            print(f"| {num} | {result['peak_mib']:.0f} | {result['seconds']:.1f} | {held:.1f} |", flush=True)
        if peaks:
            print(f"\npeak RSS at N = {args.nums[-1]} / at N = {args.nums[0]}: {peaks[-1] / peaks[0]:.3f}\n")

        # 1 and 2 processes alternate, so that a change in the machine's load hits both alike.
        rates, cpu, distances = {1: [], 2: []}, {1: [], 2: []}, {}
        for repeat in range(args.repeats):
            for num_processes in (1, 2):
                out = os.path.join(folder, f"t{num_processes}.json")
                result = run([*common, "--num", str(args.throughput_num), "--out", out], num_processes)
                rates[num_processes].append(args.throughput_num / result["seconds"])
                cpu[num_processes].append(result["cpu_seconds"])
                distances.setdefault(num_processes, result["frechet_distance"])
                assert distances[num_processes] == result["frechet_distance"]
                print(
                    f"repeat {repeat}, {num_processes} process(es): {args.throughput_num} images in "
                    f"{result['seconds']:.1f} s = {rates[num_processes][-1]:.1f} images/s, "
                    f"{result['cpu_seconds']:.1f} CPU-seconds in all (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    ratios = sorted(two / one for one, two in zip(rates[1], rates[2]))
    one_rate, two_rate = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\nmedian images/s: 1 process {one_rate:.1f}, 2 processes {two_rate:.1f}")
    print(
        f"wall clock, 2 processes / 1 process, per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}; median "
        f"{statistics.median(ratios):.2f}x, scaling efficiency {statistics.median(ratios) / 2:.0%}"
    )
    # The CPU time the job costs in all does not depend on how many other jobs share the machine: the ratio is the
    # scaling efficiency two processes reach when each has a core of its own.
    one_cpu, two_cpu = statistics.median(cpu[1]), statistics.median(cpu[2])
    print(
        f"median CPU-seconds for the job: 1 process {one_cpu:.1f}, 2 processes {two_cpu:.1f}; "
        f"efficiency with a core per process {one_cpu / two_cpu:.0%}"
    )
    print(f"Frechet distance, 1 process: {distances[1]!r}; 2 processes: {distances[2]!r}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
