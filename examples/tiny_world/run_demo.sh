#!/usr/bin/env bash
# README command 1: alignment you can see, on the CPU.
#   set up .venv -> tiny Pick-a-Pic world (raters prefer the ball in the top half) -> a tiny SDXL base model
#   pre-trained to draw its balls (shipped in examples/tiny_world/bases/; pretrain_tiny_world.py rebuilds it)
#   -> MaPO (--beta_mapo 8) -> the same seeds sampled from base and trained model (examples/eval/generate.py)
#   -> judged by the toy_ball reward (score.py, compare.py) -> top-half share with its interval and a labelled
#   before/after grid (examples/tiny_world/report.py).
# demo_output/ (or DEMO_OUTPUT_DIR) is rewritten on every run. Extra arguments go to train_mapo_sdxl.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash examples/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
assets=${TINY_ASSETS_DIR:-tiny_assets}
out=${DEMO_OUTPUT_DIR:-demo_output}
python=.venv/bin/python
if [ ! -f "$assets/tiny-pickapic/test.parquet" ]; then
  $python -m examples.tiny_world.make_tiny_assets --output_dir "$assets" --skip_model --overwrite
fi
base=examples/tiny_world/bases/tiny-world-sdxl
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)

.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_mapo_sdxl.py --beta_mapo 8 \
  --pretrained_model_name_or_path "$base" \
  --dataset_name "$assets/tiny-pickapic" --preference_eval_split test --preference_eval_timesteps 32 \
  --resolution 64 --train_batch_size 8 --max_train_steps 200 \
  --learning_rate 5e-5 --lr_scheduler constant --lr_warmup_steps 0 \
  --validation_prompts "a photo of a red ball" "a photo of a blue ball" --validation_steps 100 --validation_inference_steps 20 \
  --checkpointing_steps 100 --checkpoints_total_limit 1 --seed 0 --report_to tensorboard \
  --output_dir "$out/mapo" "$@"

printf '%s\n' "a photo of a red ball" "a photo of a green ball" "a photo of a blue ball" \
  "a photo of a yellow ball" "a photo of a purple ball" "a photo of a cyan ball" > "$out/prompts.txt"
sampling=(--pretrained_model_name_or_path "$base" --prompts "$out/prompts.txt" --images_per_prompt 16 --seed 0
  --resolution 64 --num_inference_steps 20 --guidance_scale 5 --batch_size 48 --output_dir "$out/generated")
$python -m examples.eval.generate "${sampling[@]}" --model_name base
$python -m examples.eval.generate "${sampling[@]}" --model_name mapo --unet_path "$out/mapo"
$python -m examples.eval.score --run_dirs "$out/generated/base" "$out/generated/mapo" --reward_models toy_ball
$python -m examples.eval.compare --runs "$out/generated/base" "$out/generated/mapo" --baseline base \
  --num_bootstrap 2000 --output_prefix "$out/comparison"
$python -m examples.tiny_world.report --runs "$out/generated/base" "$out/generated/mapo" \
  --names base "MaPO (beta 8)" --grid "$out/tiny_world_grid.png" --output_json "$out/tiny_world_report.json" \
  --training_summary "$out/mapo/training_summary.json"
echo "== demo finished in $(( $(date +%s) - start )) s after set-up: grid in $out/tiny_world_grid.png"
