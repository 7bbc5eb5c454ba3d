#!/usr/bin/env bash
# The GPU pass of BENCHMARKS.md in one command: the CUDA checks of the trainer and the
# server, then the GPU benchmarks, each step's output in OUT_DIR/<step>.log and a summary
# line per step on stdout (its exit code, seconds, last lines). A step that fails or
# outlives its limit is reported and the next one runs, so one short lease yields what
# it can. Run from the repository root, with the package's dependencies installed:
#
#   bash bench/gpu_pass.sh OUT_DIR [STEP...]     # steps: all of those below, in order
#
# ~10 minutes on an H200 with every step (estimated; the limits add up to more, each a
# ceiling). The steps run in the order of what the open issues still need, so a lease
# that ends early has the most of it: the zero-argument CUDA run and torchrun over nccl
# (issue 4), the CUDA tests, the decode and serving benchmarks (issue 6), then the chat
# fine-tune. Two runs fit a 10-minute command: `env pretrain ddp tests` and then
# `checkpoint decode serve decode-compiled chat`. The checkpoints stay in RUNS_DIR
# (default /tmp/pocketgpt-gpu-pass) for a later run's steps: `chat` fine-tunes what
# `pretrain` wrote, the benchmarks read what `checkpoint` wrote; a step that writes one
# starts its folder afresh.
# A rehearsal on a machine without a GPU: DEVICE=cpu PRESET=tiny TRAIN_LIMIT="--preset tiny --max-steps 3".
set -u
out=${1:?usage: bash bench/gpu_pass.sh OUT_DIR [STEP...]}
shift
known="env pretrain ddp tests checkpoint decode serve decode-compiled chat"
steps=${*:-$known}
for name in $steps; do
    if [[ " $known " != *" $name "* ]]; then
        echo "bench/gpu_pass.sh: unknown step '$name' (steps: $known)" >&2
        exit 2
    fi
done
device=${DEVICE:-cuda}
preset=${PRESET:-base}
train_limit=${TRAIN_LIMIT:-}
runs=${RUNS_DIR:-/tmp/pocketgpt-gpu-pass}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
# The repository's packages without an install (a bare GPU machine's copy of the tree).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME SECONDS COMMAND...: runs it under a time limit, logs it, reports it.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s): $*"
    tail -n 4 "$out/$name.log" | sed 's/^/   /'
}

for name in $steps; do
    case $name in
    env)
        step env 60 bash -c 'nvidia-smi -L; lscpu | grep "Model name"; python3 -c "
import torch, transformers
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")"'
        ;;
    pretrain)
        # The zero-argument run (issue 4): the device's default budget, bf16, compiled.
        rm -rf "$runs/default"
        # shellcheck disable=SC2086  # TRAIN_LIMIT is flags, split on purpose
        step pretrain 300 python3 -m training.pretrain --out-dir "$runs/default" $train_limit
        ;;
    ddp)
        # DistributedDataParallel over nccl (gradients) and gloo (CPU tensors), one rank
        # per GPU: this machine has one, so one rank.
        rm -rf "$runs/ddp"
        step ddp 180 torchrun --standalone --nproc_per_node 1 -m training.pretrain \
            --preset tiny --max-steps 20 --device "$device" --out-dir "$runs/ddp"
        ;;
    checkpoint)
        # The benchmarks' model: the `base` preset after one step (its speed is the
        # same untrained; the benchmarks ignore end-of-text).
        rm -rf "$runs/bench"
        step checkpoint 180 python3 -m training.pretrain --preset "$preset" --max-steps 1 \
            --block-size 512 --device "$device" --out-dir "$runs/bench"
        ;;
    decode)
        # CUDA graphs, timed by CUDA events read after the run.
        step decode 180 python3 -m bench.decode --checkpoint "$runs/bench" --device "$device" \
            --batch-sizes 1,8,32
        ;;
    decode-compiled)
        # The server's `--cuda-graphs false --compile-decode true`: compiled, not captured.
        step decode-compiled 240 python3 -m bench.decode --checkpoint "$runs/bench" \
            --device "$device" --batch-sizes 1,32 --compile --no-cuda-graphs
        ;;
    serve)
        # 128 streams at once, four tokens per SSE event (one event per token measured
        # 35% over the raw engine in the second H200 pass).
        step serve 240 python3 -m bench.serve --checkpoint "$runs/bench" --device "$device" \
            --clients 32,128 --max-batch 128 --compile-decode --stream-interval 4
        ;;
    tests)
        # The tests with CUDA cases: CUDA graphs eager and compiled (which must not rebuild
        # when the batch changes), the plain loop's fp32 products, bf16 defaults on Ampere+.
        step tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_runner.py \
            tests/test_bench_smoke.py::test_the_plain_loop_multiplies_fp32_as_the_trainer_does \
            tests/test_training_args.py::test_auto_settings_resolve_to_what_the_hardware_does_best
        ;;
    chat)
        # A chat fine-tune of the zero-argument model (`pretrain` first): conversations
        # packed in windows under a block-diagonal mask, bf16, on CUDA. The README's
        # example: "What does `len` do?" answered with the docstring's first line.
        python3 -c '
import builtins, inspect, json
for name in sorted(dir(builtins)):
    doc = inspect.getdoc(getattr(builtins, name))
    if doc and not name.startswith("_"):
        messages = [{"role": "user", "content": f"What does `{name}` do?"},
                    {"role": "assistant", "content": doc.splitlines()[0]}]
        print(json.dumps({"messages": messages}))' >"$runs/chats.jsonl"
        rm -rf "$runs/chat"
        step chat 180 python3 -m training.pretrain --init-from "$runs/default" \
            --data "$runs/chats.jsonl" --out-dir "$runs/chat"
        ;;
    esac
done
