"""The 2-D world, the denoiser, the experiments and their report (examples/playground_2d/README.md).

Every objective is the training scripts' own function, called through its module (`train_ddspo.ddspo_loss`, ...)
so that a change to a script's loss changes the playground; noise, targets and weights come from `utils/`, the
schedule from diffusers, CaPO's calibration and pair selection from examples/lib/calibration.py.

Seeds and β values train side by side: the denoiser is a stack of M independent MLPs ("members", one per
(setting, seed)), evaluated in one batched call. The objectives are means over pairs, so M times the objective of
the M·B pairs of a step is the sum of the members' own objectives, and Adam updates each weight on its own: each
member trains exactly as it would alone.
"""

import argparse
import math
import time
import zlib

import numpy as np
import torch
from diffusers import DDPMScheduler

import train_capo
import train_ddspo
import train_diffusion_dpo_sdxl
import train_mapo_sdxl
from examples.lib import calibration
from examples.playground_2d import metrics, report
from utils.diffusion import (
    log_snr,
    noisy_latents_and_target,
    per_sample_mse,
    sigmoid_loss_weight,
)


NUM_TRAIN_TIMESTEPS = 1000  # DDPM's linear schedule, as SD1.x / SDXL count timesteps (MaPO's T in Eq. 6)
TIME_FEATURES = 16
CLASS_FEATURES = 16
MAPO_SNR_VALUE = 0.5  # train_mapo_sdxl.py's --snr_value default (App. A)
CAPO_SIGMOID_BIAS = 1.5  # train_capo.py's --sigmoid_bias default, the paper's SDXL b
CAPO_TEMPERATURE = 1.0  # Eq. 2: the reward below is a Bradley-Terry logit in its own units
DIVERGED_RADIUS = 1e3  # a sample this far from the origin (the modes sit at radius 2) means the member blew up


# ----------------------------------------------------------------------------------------------
# The world: K Gaussian modes on a circle, one per class (DDSPO Fig. 2a) and a noisy version of it (Fig. 2b)
# ----------------------------------------------------------------------------------------------
class World:
    def __init__(self, num_classes, radius, mode_std, noisy_std, label_noise):
        angles = 2 * math.pi * np.arange(num_classes) / num_classes
        self.centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (K, 2)
        self.num_classes, self.mode_std, self.noisy_std, self.label_noise = (
            num_classes,
            mode_std,
            noisy_std,
            label_noise,
        )

    def neighbours(self, label):
        return (label + 1) % self.num_classes, (label - 1) % self.num_classes

    def ground_truth(self, labels, rng, shift=0.0):
        """Points of each label's mode; `shift` moves every mode outward along its radius (the mismatch study)."""
        centres = self.centres[labels]
        outward = centres / np.linalg.norm(centres, axis=-1, keepdims=True)
        return centres + shift * outward + self.mode_std * rng.standard_normal(centres.shape)

    def noisy(self, labels, rng):
        """The reference's training data: wider modes, and a share of each class drawn from a neighbour's mode."""
        labels = np.asarray(labels)
        mislabelled = rng.random(labels.shape) < self.label_noise
        step = np.where(rng.random(labels.shape) < 0.5, 1, -1)
        source = np.where(mislabelled, (labels + step) % self.num_classes, labels)
        return self.centres[source] + self.noisy_std * rng.standard_normal((*labels.shape, 2))


def world_from(args):
    return World(args.num_classes, args.radius, args.mode_std, args.noisy_std, args.label_noise)


def data_rng(seed, purpose):
    """The numpy draws of one seed for one purpose, independent of every other purpose."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]))


def torch_generator(seed, purpose):
    return torch.Generator().manual_seed(int(data_rng(seed, purpose).integers(2**62)))


# ----------------------------------------------------------------------------------------------
# The denoiser: M independent MLPs eps(x_t, t, c) with a class embedding
# ----------------------------------------------------------------------------------------------
class StackedDenoiser(torch.nn.Module):
    def __init__(self, num_members, num_classes, hidden, generator):
        super().__init__()
        widths = [2 + TIME_FEATURES + CLASS_FEATURES, hidden, hidden, hidden, 2]
        self.class_embedding = torch.nn.Parameter(
            torch.randn(num_members, num_classes, CLASS_FEATURES, generator=generator)
        )
        self.weights, self.biases = torch.nn.ParameterList(), torch.nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1 / math.sqrt(fan_in)  # torch.nn.Linear's initialisation
            weight = (torch.rand(num_members, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            bias = (torch.rand(num_members, 1, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(torch.nn.Parameter(weight))
            self.biases.append(torch.nn.Parameter(bias))
        half = TIME_FEATURES // 2
        self.register_buffer("frequencies", torch.exp(-math.log(10000.0) * torch.arange(half) / half))

    @property
    def num_members(self):
        return self.class_embedding.shape[0]

    def forward(self, noisy, timesteps, labels):
        """noisy (M, N, 2), timesteps (M, N), labels (M, N) -> predicted noise (M, N, 2)."""
        angles = timesteps[..., None].float() * self.frequencies  # (M, N, TIME_FEATURES / 2)
        members = torch.arange(self.num_members)[:, None]
        hidden = torch.cat([noisy, angles.sin(), angles.cos(), self.class_embedding[members, labels]], dim=-1)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(bias, hidden, weight)
            if layer < len(self.weights) - 1:
                hidden = torch.nn.functional.silu(hidden)
        return hidden

    def members(self, indices):
        """A new stack whose members are copies of members `indices` of this one."""
        copy = StackedDenoiser.__new__(StackedDenoiser)
        torch.nn.Module.__init__(copy)
        copy.class_embedding = torch.nn.Parameter(self.class_embedding.detach()[indices].clone())
        copy.weights = torch.nn.ParameterList([torch.nn.Parameter(w.detach()[indices].clone()) for w in self.weights])
        copy.biases = torch.nn.ParameterList([torch.nn.Parameter(b.detach()[indices].clone()) for b in self.biases])
        copy.register_buffer("frequencies", self.frequencies.clone())
        return copy

    def diverged(self):
        """(M,) bool: a member with a non-finite weight."""
        flat = [p.detach().flatten(1) for p in self.parameters()]
        return ~torch.cat(flat, dim=1).isfinite().all(dim=1)


def make_scheduler():
    # clip_sample off: the points are not images in [-1, 1].
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", clip_sample=False)


def noised(noise_scheduler, points, noise, timesteps):
    """x_t and the forward-process target for points (M, B, 2), through utils (which wants a flat batch)."""
    shape = points.shape
    noisy, target = noisy_latents_and_target(
        noise_scheduler, points.flatten(0, 1), noise.flatten(0, 1), timesteps.flatten()
    )
    return noisy.view(shape), target.view(shape)


def errors(prediction, target):
    """err(prediction, target) of each of the M·B points (M, B, 2) -> (M·B,), as every script computes it."""
    return per_sample_mse(prediction.flatten(0, 1), target.flatten(0, 1))


def take(values, indices):
    """values (M, P, ...) at indices (M, B) -> (M, B, ...)."""
    return values[torch.arange(values.shape[0])[:, None], indices]


@torch.no_grad()
def sample(model, labels, generator, num_inference_steps):
    """DDPM ancestral sampling of every member for labels (M, N) -> points (M, N, 2)."""
    noise_scheduler = make_scheduler()
    noise_scheduler.set_timesteps(num_inference_steps)
    points = torch.randn(*labels.shape, 2, generator=generator)
    for timestep in noise_scheduler.timesteps:
        prediction = model(points, torch.full(labels.shape, int(timestep)), labels)
        points = noise_scheduler.step(prediction, timestep, points, generator=generator).prev_sample
    return points


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_reference(world, seeds, args):
    """One reference per seed, trained on the noisy world (DDSPO Fig. 2b -> 2c) with the plain denoising loss."""
    model = StackedDenoiser(len(seeds), world.num_classes, args.hidden, torch_generator(seeds[0], "init"))
    labels = np.tile(np.arange(world.num_classes), args.reference_points_per_class)
    data = torch.tensor(np.stack([world.noisy(labels, data_rng(seed, "noisy data")) for seed in seeds]))
    data, labels = data.float(), torch.tensor(labels).expand(len(seeds), -1)
    noise_scheduler, generator = make_scheduler(), torch_generator(seeds[0], "reference draws")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.reference_learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.reference_steps)
    shape = (len(seeds), args.reference_batch_size)
    for _ in range(args.reference_steps):
        indices = torch.randint(data.shape[1], shape, generator=generator)
        timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, shape, generator=generator)
        noisy, target = noised(
            noise_scheduler, take(data, indices), torch.randn(*shape, 2, generator=generator), timesteps
        )
        loss = errors(model(noisy, timesteps, take(labels, indices)), target).mean() * len(seeds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model, data, labels


def finetune(reference, member_seeds, objective, args, generator):
    """Fine-tune copies of the reference members `member_seeds` (one index per member) with `objective`.

    `objective(model, frozen, generator)` returns the loss of one step summed over members. One learning rate and
    one step count for every method (args.learning_rate, args.finetune_steps), Adam without schedule.
    """
    model, frozen = reference.members(member_seeds), reference.members(member_seeds).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    for _ in range(args.finetune_steps):
        loss = objective(model, frozen, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def pair_draws(num_pairs, shape, generator, independent_noise=False):
    """One step's draws for B pairs per member: which pair, one timestep per pair, and the noise of both images
    (shared, as Diffusion-DPO, MaPO and DDSPO do, or independent, as CaPO does)."""
    indices = torch.randint(num_pairs, shape, generator=generator)
    timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, shape, generator=generator)
    noise_w = torch.randn(*shape, 2, generator=generator)
    noise_l = torch.randn(*shape, 2, generator=generator) if independent_noise else noise_w
    return indices, timesteps, noise_w, noise_l


def per_pair(values, batch_size):
    """A per-member setting (M,) repeated for each of its B pairs -> (M·B,), the layout of `errors`."""
    return torch.as_tensor(values, dtype=torch.float32).repeat_interleave(batch_size)


def both(model, noisy_w, noisy_l, timesteps, labels_w, labels_l):
    """One call for the two branches of B pairs: returns the predictions on x_t^w and on x_t^l."""
    prediction = model(
        torch.cat([noisy_w, noisy_l], 1), torch.cat([timesteps, timesteps], 1), torch.cat([labels_w, labels_l], 1)
    )
    return prediction.chunk(2, dim=1)


def preference_objective(method, pairs, betas, batch_size):
    """The one-step objective of `method` on `pairs` (dict of (M, P, ...) tensors), β per member (M,) or a number.

    Methods: "dpo" (Diffusion-DPO), "ddspo" (targets from the reference conditioned on c and c-), "mapo", "sft",
    "capo" and "capo_dpo" (CaPO's DPO baseline on the same calibrated pairs).
    """
    noise_scheduler = make_scheduler()
    num_members, num_pairs = pairs["labels"].shape

    def objective(model, frozen, generator):
        shape = (num_members, batch_size)
        indices, timesteps, noise_w, noise_l = pair_draws(num_pairs, shape, generator, method.startswith("capo"))
        labels = take(pairs["labels"], indices)
        noisy_w, target_w = noised(noise_scheduler, take(pairs["points_w"], indices), noise_w, timesteps)
        noisy_l, target_l = noised(noise_scheduler, take(pairs["points_l"], indices), noise_l, timesteps)
        beta = per_pair(betas, batch_size) if not np.isscalar(betas) else betas
        if method == "sft":
            loss, _ = train_diffusion_dpo_sdxl.sft_loss(errors(model(noisy_w, timesteps, labels), target_w))
            return loss * num_members
        prediction_w, prediction_l = both(model, noisy_w, noisy_l, timesteps, labels, labels)
        if method == "ddspo":
            negative_labels = take(pairs["negative_labels"], indices)
            with torch.no_grad():  # Eq. 7: tgt_w = ref(x_t^w, c), tgt_l = ref(x_t^l, c-), and ref(x_t^l, c)
                three = frozen(
                    torch.cat([noisy_w, noisy_l, noisy_l], 1),
                    timesteps.repeat(1, 3),
                    torch.cat([labels, negative_labels, labels], 1),
                )
                target_w, target_l, reference_l = three.chunk(3, dim=1)
            loss, _ = train_ddspo.ddspo_loss(
                errors(prediction_w, target_w),
                errors(prediction_l, target_l),
                None,
                errors(reference_l, target_l),
                beta,
            )
            return loss * num_members
        if method == "mapo":
            loss, _ = train_mapo_sdxl.mapo_loss(
                errors(prediction_w, target_w),
                errors(prediction_l, target_l),
                beta,
                MAPO_SNR_VALUE,
                NUM_TRAIN_TIMESTEPS,
            )
            return loss * num_members
        with torch.no_grad():
            reference_w, reference_l = both(frozen, noisy_w, noisy_l, timesteps, labels, labels)
        model_w, model_l = errors(prediction_w, target_w), errors(prediction_l, target_l)
        ref_w, ref_l = errors(reference_w, target_w), errors(reference_l, target_l)
        if method == "dpo":
            loss, _ = train_diffusion_dpo_sdxl.diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta)
            return loss * num_members
        weight = sigmoid_loss_weight(log_snr(noise_scheduler, timesteps.flatten()), CAPO_SIGMOID_BIAS)  # (M·B,)
        rewards_pos = take(pairs["rewards_w"], indices).flatten()
        rewards_neg = take(pairs["rewards_l"], indices).flatten()
        loss, _ = train_capo.capo_loss(
            model_w,
            model_l,
            ref_w,
            ref_l,
            weight,
            weight,
            rewards_pos,
            rewards_neg,
            beta,
            method.removeprefix("capo_"),
        )
        return loss * num_members

    return objective


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(model, world, member_seeds, args, purpose, shifts=None):
    """Per member and class: mode accuracy, SWD to the ground-truth mode (shifted by the member's shift, if any),
    spread. Returns (samples (M, K, S, 2), {metric: (M, K) array}); a diverged member's metrics are NaN."""
    num_members, per_class = model.num_members, args.samples_per_class
    labels = torch.arange(world.num_classes).repeat_interleave(per_class).expand(num_members, -1)
    points = sample(model, labels, torch_generator(args.seed, f"sampling {purpose}"), args.sampling_steps)
    points = points.view(num_members, world.num_classes, per_class, 2).double().numpy()
    diverged = model.diverged().numpy() | ~np.isfinite(points).all(axis=(1, 2, 3))
    diverged |= np.nan_to_num(np.abs(points), nan=np.inf).max(axis=(1, 2, 3)) > DIVERGED_RADIUS
    results = {name: np.full((num_members, world.num_classes), np.nan) for name in ("mode_acc", "swd", "spread")}
    for member, seed in enumerate(member_seeds):
        if diverged[member]:
            continue
        shift = 0.0 if shifts is None else shifts[member]
        for label in range(world.num_classes):
            truth = world.ground_truth(np.full(per_class, label), data_rng(seed, f"truth {label} {shift}"), shift)
            results["mode_acc"][member, label] = metrics.mode_accuracy(points[member, label], world.centres, label)
            results["swd"][member, label] = metrics.sliced_wasserstein(points[member, label], truth)
            results["spread"][member, label] = metrics.spread(points[member, label])
    return points, results


def reward(points, centres):
    """The CaPO experiment's reward on the plane: minus the squared distance to the class centre (a logit)."""
    return -((points - centres) ** 2).sum(axis=-1)


# ----------------------------------------------------------------------------------------------
# The experiments (beta_sweep: the modes experiment over a β grid, in two rounds of seeds)
# ----------------------------------------------------------------------------------------------
def grid(*axes):
    """Every combination of the axes, the last varying fastest: [(a0, b0), (a0, b1), ...]."""
    combos = [()]
    for axis in axes:
        combos = [(*combo, value) for combo in combos for value in axis]
    return combos


def modes_experiment(world, reference, seeds, args):
    """DDSPO Fig. 2: N pairs per class, winner ~ ref(.|c), loser ~ ref(.|c-) with c- a neighbouring class; the
    neighbours alternate (c+1, c-1, c+1, ...) so that both sides are pushed away."""
    labels, negative_labels = [], []
    for label in range(world.num_classes):
        for pair in range(args.pairs_per_class):
            labels.append(label)
            negative_labels.append(world.neighbours(label)[pair % 2])
    labels = torch.tensor(labels).expand(len(seeds), -1)
    negative_labels = torch.tensor(negative_labels).expand(len(seeds), -1)
    points_w = sample(reference, labels, torch_generator(args.seed, "modes winners"), args.sampling_steps)
    points_l = sample(reference, negative_labels, torch_generator(args.seed, "modes losers"), args.sampling_steps)
    members = grid(args.betas, range(len(seeds)))
    member_seeds = [seed_index for _, seed_index in members]
    pairs = {
        "labels": labels[member_seeds],
        "negative_labels": negative_labels[member_seeds],
        "points_w": points_w[member_seeds],
        "points_l": points_l[member_seeds],
    }
    betas = [beta for beta, _ in members]
    runs = {}
    for method in ("dpo", "ddspo"):
        generator = torch_generator(args.seed, f"modes {method}")
        objective = preference_objective(method, pairs, betas, args.batch_size)
        model = finetune(reference, member_seeds, objective, args, generator)
        points, results = evaluate(model, world, [seeds[i] for i in member_seeds], args, f"modes {method}")
        runs[method] = {
            "members": [{"beta": beta, "seed": seeds[i]} for beta, i in members],
            "points": points,
            **results,
        }
    return {"pairs": {key: value[: len(seeds)].numpy() for key, value in pairs.items()}, "runs": runs}


def mismatch_experiment(world, reference, seeds, args):
    """MaPO §3.1: winners drawn from the ground-truth modes moved outward by a shift d, losers from the reference;
    Diffusion-DPO (anchored to the reference) against reference-free MaPO and SFT, at every shift."""
    per_class = args.mismatch_pairs_per_class
    labels = torch.arange(world.num_classes).repeat_interleave(per_class)
    points_l = sample(
        reference, labels.expand(len(seeds), -1), torch_generator(args.seed, "mismatch losers"), args.sampling_steps
    )
    methods = [("dpo", beta) for beta in args.betas] + [("mapo", beta) for beta in args.mapo_betas] + [("sft", None)]
    runs = {}
    members = grid(args.shifts, range(len(seeds)))
    member_seeds = [seed_index for _, seed_index in members]
    shifts = [shift for shift, _ in members]
    winners = [
        world.ground_truth(labels.numpy(), data_rng(seeds[seed_index], f"mismatch winners {shift}"), shift)
        for shift, seed_index in members
    ]
    pairs = {
        "labels": labels.expand(len(members), -1),
        "points_w": torch.tensor(np.stack(winners)).float(),
        "points_l": points_l[member_seeds],
    }
    for method, beta in methods:
        name = method if beta is None else f"{method} {beta:g}"
        generator = torch_generator(args.seed, f"mismatch {name}")
        objective = preference_objective(method, pairs, beta if beta is not None else 0.0, args.batch_size)
        model = finetune(reference, member_seeds, objective, args, generator)
        _, results = evaluate(model, world, [seeds[i] for i in member_seeds], args, f"mismatch {name}", shifts)
        members_info = [{"method": method, "beta": beta, "shift": shift, "seed": seeds[i]} for shift, i in members]
        runs[name] = {"members": members_info, **results}
    reference_copy = reference.members(member_seeds)
    _, results = evaluate(reference_copy, world, [seeds[i] for i in member_seeds], args, "mismatch reference", shifts)
    runs["reference"] = {"members": [{"shift": shift, "seed": seeds[i]} for shift, i in members], **results}
    return {"runs": runs}


def capo_experiment(world, reference, seeds, args):
    """CaPO: N images per group from the reference, a reward on the plane, Eq. 7 calibration and best-vs-worst
    selection with examples/lib/calibration.py, then CaPO and CaPO's DPO baseline on the same pairs."""
    groups, images = args.capo_groups_per_class, args.capo_images_per_group
    labels = torch.arange(world.num_classes).repeat_interleave(groups * images)
    drawn = sample(
        reference, labels.expand(len(seeds), -1), torch_generator(args.seed, "capo images"), args.sampling_steps
    )
    drawn = drawn.view(len(seeds), world.num_classes * groups, images, 2).double().numpy()
    group_labels = np.arange(world.num_classes).repeat(groups)
    pairs = {"labels": [], "points_w": [], "points_l": [], "rewards_w": [], "rewards_l": []}
    for seed_index in range(len(seeds)):
        row = {key: [] for key in pairs}
        for group, label in enumerate(group_labels):
            scores = reward(drawn[seed_index, group], world.centres[label])
            calibrated = calibration.calibrate(scores, "bradley_terry", temperature=CAPO_TEMPERATURE)
            chosen, skip = calibration.select_pairs(calibrated, "best_worst")
            if skip is not None:
                raise RuntimeError(f"CaPO group {group} of seed {seeds[seed_index]} gave no pair ({skip}).")
            positive, negative = chosen[0]
            for key, value in (
                ("labels", label),
                ("points_w", drawn[seed_index, group, positive]),
                ("points_l", drawn[seed_index, group, negative]),
                ("rewards_w", calibrated[positive]),
                ("rewards_l", calibrated[negative]),
            ):
                row[key].append(value)
        for key in pairs:
            pairs[key].append(np.array(row[key]))
    pairs = {key: torch.tensor(np.stack(value)) for key, value in pairs.items()}
    pairs = {key: value if key == "labels" else value.float() for key, value in pairs.items()}
    members = grid(args.betas, range(len(seeds)))
    member_seeds = [seed_index for _, seed_index in members]
    member_pairs = {key: value[member_seeds] for key, value in pairs.items()}
    betas = [beta for beta, _ in members]
    runs = {}
    for method in ("capo", "capo_dpo"):
        generator = torch_generator(args.seed, f"capo {method}")
        objective = preference_objective(method, member_pairs, betas, args.batch_size)
        model = finetune(reference, member_seeds, objective, args, generator)
        points, results = evaluate(model, world, [seeds[i] for i in member_seeds], args, f"capo {method}")
        results["reward"] = np.stack(
            [reward(points[m], world.centres[:, None, :]).mean(-1) for m in range(len(members))]
        )
        results["reward"][np.isnan(results["swd"])] = np.nan
        runs[method] = {
            "members": [{"beta": beta, "seed": seeds[i]} for beta, i in members],
            "points": points,
            **results,
        }
    return {"pairs": {key: value.numpy() for key, value in pairs.items()}, "runs": runs}


def with_settings(args, **changes):
    """A copy of the flags with some of them changed (an experiment run again on another grid or other seeds)."""
    return argparse.Namespace(**{**vars(args), **changes})


def beta_sweep_experiment(world, reference, seeds, args):
    """The class-modes experiment over --sweep_betas in two rounds: the run's seeds at every β, then
    --sweep_more_seeds fresh seeds (their own references and pairs) at every β where Diffusion-DPO's and DDSPO's
    mode-accuracy intervals overlapped in the first round, so that a gap there can be confirmed or ruled out.

    A round holds its seeds, their reference's results, the pairs and the runs; the second also the training data
    of its first seed (for the figure; the first round's is the run's)."""
    first = modes_experiment(world, reference, seeds, with_settings(args, betas=args.sweep_betas))
    rounds = [{"seeds": seeds, "reference": reference_results(world, reference, seeds, args), **first}]
    overlapping = [gap["beta"] for gap in report.sweep_round(rounds[0])["gaps"] if gap["intervals_overlap"]]
    if overlapping and args.sweep_more_seeds > 0:
        more_seeds = [seeds[-1] + 1 + index for index in range(args.sweep_more_seeds)]
        start = time.time()
        more_reference, data, data_labels = train_reference(world, more_seeds, args)
        seconds = time.time() - start
        print(f"references of seeds {more_seeds[0]}-{more_seeds[-1]} trained in {seconds:.0f} s", flush=True)
        second_args = with_settings(args, betas=overlapping, seed=more_seeds[0])
        second = modes_experiment(world, more_reference, more_seeds, second_args)
        second["reference"] = reference_results(world, more_reference, more_seeds, second_args)
        second["noisy_training_data"] = (data[0].numpy(), data_labels[0].numpy())
        rounds.append({"seeds": more_seeds, **second})
    return {"rounds": rounds}


def reference_results(world, reference, seeds, args):
    points, results = evaluate(reference, world, seeds, args, "reference")
    results["reward"] = np.stack([reward(points[m], world.centres[:, None, :]).mean(-1) for m in range(len(seeds))])
    return {"members": [{"seed": seed} for seed in seeds], "points": points, **results}


def truth_results(world, seeds, args):
    """The ground truth and the noisy data scored like a model's samples: the metrics' floor and the reference's
    target."""
    per_class = args.samples_per_class
    labels = np.arange(world.num_classes).repeat(per_class)
    out = {}
    for name, draw in (
        ("ground truth", lambda seed: world.ground_truth(labels, data_rng(seed, "truth panel"))),
        ("noisy data", lambda seed: world.noisy(labels, data_rng(seed, "noisy panel"))),
    ):
        points = np.stack([draw(seed).reshape(world.num_classes, per_class, 2) for seed in seeds])
        results = {name: np.zeros((len(seeds), world.num_classes)) for name in ("mode_acc", "swd", "spread", "reward")}
        for member, seed in enumerate(seeds):
            for label in range(world.num_classes):
                truth = world.ground_truth(np.full(per_class, label), data_rng(seed, f"truth {label} 0.0"))
                results["mode_acc"][member, label] = metrics.mode_accuracy(points[member, label], world.centres, label)
                results["swd"][member, label] = metrics.sliced_wasserstein(points[member, label], truth)
                results["spread"][member, label] = metrics.spread(points[member, label])
                results["reward"][member, label] = reward(points[member, label], world.centres[label]).mean()
        out[name] = {"members": [{"seed": seed} for seed in seeds], "points": points, **results}
    return out


def run_all(args):
    """Train the references and run the chosen experiments; returns everything the report needs."""
    world, seeds = world_from(args), [args.seed + i for i in range(args.num_seeds)]
    start = time.time()
    reference, data, data_labels = train_reference(world, seeds, args)
    print(f"references of seeds {seeds[0]}-{seeds[-1]} trained in {time.time() - start:.0f} s", flush=True)
    out = {"world": world, "seeds": seeds, "truth": truth_results(world, seeds, args)}
    out["noisy_training_data"] = (data[0].numpy(), data_labels[0].numpy())
    out["reference"] = reference_results(world, reference, seeds, args)
    experiments = {"modes": modes_experiment, "mismatch": mismatch_experiment, "capo": capo_experiment}
    experiments["beta_sweep"] = beta_sweep_experiment
    for name, experiment in experiments.items():
        if name in args.experiments:
            start = time.time()
            out[name] = experiment(world, reference, seeds, args)
            print(f"experiment {name} done in {time.time() - start:.0f} s", flush=True)
    return out
