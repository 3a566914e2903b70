"""The generation branch: guided DDIM sampling with classifier-free guidance and energy gradients.

At a guided step the energy gradient g is added to the CFG noise *only where x̂0 is formed*; the DDIM
direction term keeps the unguided noise (upstream §1.4). In `diffeditor` mode the gradient is
regional, g = k·E_scale·[M ⊙ ∇E_edit + (1−M) ⊙ ∇E_content]; in `dragon` mode it is global, as in
the DragonDiffusion paper, g = k·E_scale·∇(E_edit + E_content) (upstream's `alg='D'` kept
DiffEditor's regional split, so it was not the paper's method: reference §1.8, §8). Either is
taken w.r.t. the current latent through a feature-only pass of the same UNet (plain attention,
conditional text only).

Background blending (optional, not upstream's; Blended Latent Diffusion's device): after each of
the first `blend_background`·N steps, the latent outside the edit's region (the plan's SDE mask
grown by one latent cell) is set back to the inversion's latent at the same noise level, so the
edit is generated against the input's own surroundings instead of a re-synthesised copy of them.
Statistics matching (optional, not upstream's; appearance and paste): after each of the last
steps the object's latent is renormalised to the reference object's (`latent_statistics`).
Reading the features at a fixed level (optional, not upstream's; `EditPlan.feature_timestep`):
at the noisier guided steps the energies compare the features of the step's own prediction,
brought down to that level by deterministic DDIM steps (`feature_substeps`: one by default),
with the inversion's features there, instead of features read at the step's own noise level,
where a small model's decoder features no longer find shifted content (docs/benchmarks.md,
"Reading the energies' features at t = 501" and "Bringing the prediction to t = 501 in two DDIM
steps").

Two schedules: `dragon` (DragonDiffusion: global guidance at the first 30 of 50 steps, no image
prompt) and `diffeditor` (DiffEditor: regional guidance at every step below 10 then at even steps to
28, regional SDE at steps 11–19, time travel at steps 22–28). Step indices are given for 50 steps
and scale with the step count.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .attention import BankMode, MemoryBank
from .composite import Vacated
from .ddim import DDIMTimesteps, invert_step, predict_x0, sigma, step_to
from .errors import InputError, SamplingDiverged, require_share
from .features import FeatureExtractor, energy_grid, upsample
from .geometry import grow
from .inversion import Inversion
from .latent_statistics import StatisticsMatch

EnergyFn = Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
MODES = ("diffeditor", "dragon")


def scaled_step(step_of_50: int, num_steps: int) -> int:
    """A step index given for a 50-step run, mapped proportionally to a `num_steps` run."""
    return round(step_of_50 * num_steps / 50)


def steps_between(first: int, stop: int, num_steps: int, even: bool = False) -> frozenset[int]:
    """Steps first ≤ i < stop of a 50-step run, scaled to `num_steps`; optionally even i only."""
    lo, hi = scaled_step(first, num_steps), scaled_step(stop, num_steps)
    return frozenset(i for i in range(lo, hi) if not even or i % 2 == 0)


@dataclass(frozen=True)
class GuidanceSchedule:
    """Per-step policy of the sampler (i = 0 is the noisiest step).

    guided: steps with an energy gradient; sde: steps with the regional SDE (η_inside within the
    plan's SDE mask, η_outside elsewhere); time_travel: steps run `repeats` times, rolled back by
    one DDIM-inversion step between runs; image_prompt: steps where the image prompt is on;
    regional: the gradient splits by the plan's edit mask (∇E_edit inside, ∇E_content outside),
    else both energies' gradient applies everywhere.
    """

    mode: str
    num_steps: int
    guided: frozenset[int]
    sde: frozenset[int] = frozenset()
    time_travel: frozenset[int] = frozenset()
    repeats: int = 1
    image_prompt: frozenset[int] = frozenset()
    eta_inside: float = 0.0
    eta_outside: float = 0.0
    regional: bool = True

    @classmethod
    def dragon(cls, num_steps: int) -> GuidanceSchedule:
        """DragonDiffusion: global guidance at every one of the first 30 of 50 steps; nothing
        else (no SDE, no time travel, no image prompt)."""
        return cls("dragon", num_steps, steps_between(0, 30, num_steps), regional=False)

    @classmethod
    def diffeditor(
        cls, num_steps: int, eta_inside: float = 0.4, eta_outside: float = 0.0, repeats: int = 3
    ) -> GuidanceSchedule:
        """DiffEditor as upstream runs it (§1.5–§1.7 of our reading of the code).

        Guidance at i < 10 and even i < 30; SDE at 10 < i < 20 (η 0.4 inside the edit, 0 outside:
        the paper says 0.2 outside, the code 0); time travel at even 20 < i < 30, 3 runs each;
        image prompt at 10 ≤ i < 20.
        """
        return cls(
            "diffeditor",
            num_steps,
            guided=steps_between(0, 10, num_steps) | steps_between(10, 30, num_steps, even=True),
            sde=steps_between(11, 20, num_steps),
            time_travel=steps_between(21, 30, num_steps, even=True),
            repeats=repeats,
            image_prompt=steps_between(10, 20, num_steps),
            eta_inside=eta_inside,
            eta_outside=eta_outside,
        )

    @classmethod
    def for_mode(cls, mode: str, num_steps: int, **options: float) -> GuidanceSchedule:
        if mode == "dragon":
            return cls.dragon(num_steps)
        if mode == "diffeditor":
            return cls.diffeditor(num_steps, **options)
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")

    def runs(self, i: int, guided_edit: bool) -> int:
        """How many times step i runs (time travel applies only to edits with guidance)."""
        return self.repeats if guided_edit and i in self.time_travel else 1


def nearest_step(steps: DDIMTimesteps, timestep: float) -> int:
    """Index of the step whose timestep is nearest to `timestep` (the noisier one on a tie)."""
    return min(range(len(steps)), key=lambda i: abs(steps.timesteps[i] - timestep))


def level_path(i: int, level: int, substeps: int) -> list[int]:
    """Step indices from step i down to the level step (i < level) in `substeps` jumps of about
    equal length on the run's own grid, both ends included (fewer where the steps run out)."""
    substeps = min(substeps, level - i)  # more jumps than steps: every step is on the path
    points = (i + round((level - i) * k / substeps) for k in range(substeps + 1))
    return sorted(set(points))


def whole_substeps(value: object) -> bool:
    """Whether `value` is a whole number of DDIM steps ≥ 1 (also as a float, as the edit weights
    are; bools are not numbers here)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    whole = number and (isinstance(value, numbers.Integral) or float(value).is_integer())
    return whole and value >= 1


def require_substeps(value: object) -> int:
    """`value` as an int where it is a whole number of DDIM steps ≥ 1, else InputError."""
    if not whole_substeps(value):
        raise InputError(
            f"feature_substeps must be a whole number of DDIM steps ≥ 1 (1: one step), "
            f"got {value!r}"
        )
    return int(value)


def walk(
    unet: torch.nn.Module,
    z: torch.Tensor,
    path: list[tuple[int, float]],
    cond: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """z taken along `path` [(timestep, ᾱ), …] by deterministic DDIM steps, each with the noise a
    plain conditional UNet pass predicts at its start (the first with `eps` instead, where given);
    returns the latent and how many passes it took."""
    passes = 0
    for (t, a), (_, a_to) in itertools.pairwise(path):
        if eps is None:
            eps = unet(z, t, encoder_hidden_states=cond).sample
            passes += 1
        z, eps = invert_step(z, eps, a, a_to), None
    return z, passes


@dataclass
class EditPlan:
    """What an edit changes in the shared sampler: start latent, energy, masks and bank policy.

    z_init: (1, 4, h, w) start latent; edit_mask: (1, 1, h, w) M of the regional gradient (1 where
    the edit energy acts); sde_mask: (1, 1, h, w) where the regional SDE uses η_inside;
    energy(current, reference) → (E_edit, E_content), scalars, from feature maps on the energy grid
    (current: batch 1; reference: the inversion's batch, e.g. [base, reference image]).
    """

    edit: str
    z_init: torch.Tensor
    energy: EnergyFn
    edit_mask: torch.Tensor
    bank_mode: BankMode
    bank_steps: range
    guidance_scale: float
    energy_scale: float
    k: float
    sde_mask: torch.Tensor | None = None
    region: torch.Tensor | None = None
    """(1, 1, H, W) bool at the working size: the pixels the edit is asked to change (the
    object's old and new places, the object, the editable region and the points' patches, the
    pasted object), around which `keep_background` keeps the input's pixels (`composite`)."""
    vacated: Vacated | None = None
    """A move's or resize's old and new places (pixels, working size), whose thin vacated
    strips the kept background fills from the input (`composite.fill_thin_vacated`)."""
    composite_masks: tuple[torch.Tensor, torch.Tensor] | None = None
    params: dict = field(default_factory=dict)
    blend_background: float = 0.0
    """Share of the steps, from the first, after which the latent outside the SDE mask (grown by
    one cell) is reset to the inversion's: 0 never (upstream), 1 every step (the last one leaves
    the encoded input there exactly). Needs `sde_mask`."""
    statistics: StatisticsMatch | None = None
    """Renormalise the object's latent to a reference object's after the last steps (None: never,
    upstream)."""
    feature_timestep: float = 0.0
    """Where the energies read their features at the noisier guided steps: 0 at each step's own
    noise level (upstream); otherwise at the DDIM step whose timestep is nearest to it (`level`).
    At a guided step noisier than that one, the current features are those of the step's own
    prediction brought to the level by deterministic DDIM steps (`feature_substeps`), the first
    with the step's predicted noise; the reference features are those of the inversion's latent
    at the level; the gradient with respect to the brought latent is applied to the step's latent
    as it is."""
    feature_substeps: int = 1
    """In how many deterministic DDIM steps a noisier step's prediction is brought to the level
    (`level_path` on the run's grid): the first with the step's own predicted noise, each further
    one with one more plain conditional UNet pass (no gradient through it). 1: one jump."""

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "energy_scale", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")
        require_share("blend_background", self.blend_background, "of the steps")
        t = self.feature_timestep
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise InputError(
                f"feature_timestep must be a timestep ≥ 0 (0: each step's own), "
                f"got {self.feature_timestep}"
            )
        self.feature_substeps = require_substeps(self.feature_substeps)

    def level(self, steps: DDIMTimesteps) -> int | None:
        """Index of the step at whose noise level the energies read features at every noisier
        guided step, or None (each step reads at its own level)."""
        return None if self.feature_timestep == 0 else nearest_step(steps, self.feature_timestep)

    def blend_steps(self, num_steps: int) -> int:
        """How many steps, from the first, end with the background blended back."""
        if self.sde_mask is None:
            return 0
        return round(self.blend_background * num_steps)


@dataclass
class Evaluations:
    """Counts of UNet evaluations, in samples (a CFG pair counts 2): what an edit costs."""

    inversion: int = 0
    denoise: int = 0
    features: int = 0
    backward: int = 0
    rollback: int = 0
    bring: int = 0
    """Plain conditional passes that bring a noisier step's prediction to the plan's level
    (`EditPlan.feature_substeps` > 1)."""

    @property
    def forward(self) -> int:
        """All forward passes; feature passes stop after the second-to-last decoder block."""
        return self.inversion + self.denoise + self.features + self.rollback + self.bring

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward": self.forward}


def cfg_noise(
    unet: torch.nn.Module,
    z: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    counts: Evaluations,
) -> torch.Tensor:
    """Classifier-free-guided noise ε_u + s·(ε_c − ε_u); one conditional pass when s = 1."""
    if scale == 1.0:
        counts.denoise += z.shape[0]
        return unet(z, t, encoder_hidden_states=cond).sample
    eps = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    counts.denoise += 2 * z.shape[0]
    eps_u, eps_c = eps.chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def energy_gradient(
    features: FeatureExtractor,
    plan: EditPlan,
    z: torch.Tensor,
    t: int,
    text: torch.Tensor,
    reference: list[torch.Tensor],
    counts: Evaluations,
    regional: bool = True,
) -> torch.Tensor:
    """At latent z (1, 4, h, w): regional g = k·E_scale·[M ⊙ ∇_z E_edit + (1−M) ⊙ ∇_z E_content]
    (two backward passes), else global g = k·E_scale·∇_z (E_edit + E_content) (one)."""
    grid = energy_grid(tuple(z.shape[-2:]))
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        current = upsample(features(z, t, text), grid)
        counts.features += 1
        e_edit, e_content = plan.energy(current, reference)
        if not regional:
            counts.backward += 1
            (g,) = torch.autograd.grad(plan.energy_scale * (e_edit + e_content), z)
            return plan.k * g
        g_edit, g_content = (
            torch.autograd.grad(plan.energy_scale * e, z, retain_graph=True)[0]
            for e in (e_edit, e_content)
        )
        counts.backward += 2
    m = plan.edit_mask.to(z.dtype)
    return plan.k * (m * g_edit + (1 - m) * g_content)


def regional_sde_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    a_t: float,
    a_next: float,
    mask: torch.Tensor,
    eta_inside: float,
    eta_outside: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """DDIM-η step with η_inside where mask = 1 and η_outside elsewhere, one shared noise draw."""
    s_in, s_out = sigma(a_t, a_next, eta_inside), sigma(a_t, a_next, eta_outside)
    inside = step_to(x0, eps, a_next, s_in) + s_in * noise
    outside = step_to(x0, eps, a_next, s_out) + s_out * noise
    m = mask.to(x0.dtype)
    return m * inside + (1 - m) * outside


@dataclass
class Sampler:
    """The guided DDIM loop over one inversion and one plan; `run()` returns z_0 (1, 4, h, w)."""

    unet: torch.nn.Module
    features: FeatureExtractor
    bank: MemoryBank
    inversion: Inversion
    plan: EditPlan
    schedule: GuidanceSchedule
    steps: DDIMTimesteps
    cond: torch.Tensor
    uncond: torch.Tensor
    counts: Evaluations
    generator: torch.Generator | None = None
    set_image_prompt: Callable[[bool], None] | None = None
    callback: Callable[[dict], None] | None = None

    def image_prompt(self, on: bool) -> None:
        if self.set_image_prompt is not None:
            self.set_image_prompt(on)

    def __post_init__(self) -> None:
        self.level = self.plan.level(self.steps)
        self.level_reference: list[torch.Tensor] | None = None

    def reads_at_level(self, i: int) -> bool:
        """Whether step i's energies read their features at the plan's level (it is noisier:
        timesteps fall with the step index)."""
        return self.level is not None and i < self.level

    def features_read_at(self) -> int | None:
        """The level's timestep where some guided step of this run reads its features there,
        else None (also without an energy: nothing is guided)."""
        if self.plan.energy_scale <= 0 or not any(map(self.reads_at_level, self.schedule.guided)):
            return None
        return self.steps.timesteps[self.level]

    def reference_features(self, i: int) -> list[torch.Tensor]:
        """Features of the trajectory latents at step i (every image of the inversion); at the
        plan's level instead for a step noisier than that (computed once, and reused at the
        level's own step)."""
        if self.level is not None and i <= self.level:
            if self.level_reference is None:
                self.level_reference = self.trajectory_features(self.level)
            return self.level_reference
        return self.trajectory_features(i)

    def trajectory_features(self, i: int) -> list[torch.Tensor]:
        """Features of the inversion's latents at step i, on the energy grid."""
        z_ref = self.inversion.at_step(i)
        text = self.inversion.text[:1].expand(len(z_ref), -1, -1)
        self.counts.features += len(z_ref)
        grid = energy_grid(tuple(z_ref.shape[-2:]))
        return upsample(self.features(z_ref, self.steps.timesteps[i], text), grid)

    def step(self, i: int, z: torch.Tensor, reference: list[torch.Tensor] | None) -> torch.Tensor:
        """One denoising step i from z; guided when reference features are given."""
        plan, steps, t = self.plan, self.steps, self.steps.timesteps[i]
        self.bank.step = i
        self.bank.mode = plan.bank_mode if i in plan.bank_steps else BankMode.OFF
        self.image_prompt(i in self.schedule.image_prompt)
        try:
            eps = cfg_noise(
                self.unet, z, t, self.cond, self.uncond, plan.guidance_scale, self.counts
            )
        finally:
            self.bank.mode = BankMode.OFF
            self.image_prompt(False)
        guided_eps = eps
        if reference is not None:
            text = self.inversion.text[:1]
            z_read, t_read = z, t
            if self.reads_at_level(i):
                z_read, t_read = self.bring(i, z, eps), steps.timesteps[self.level]
            guided_eps = eps + energy_gradient(
                self.features,
                plan,
                z_read,
                t_read,
                text,
                reference,
                self.counts,
                self.schedule.regional,
            )
        x0 = predict_x0(z, guided_eps, steps.alpha[i])
        if i in self.schedule.sde and plan.sde_mask is not None:
            noise = torch.randn(z.shape, generator=self.generator).to(z.device, z.dtype)
            return regional_sde_step(
                x0,
                eps,
                steps.alpha[i],
                steps.alpha_next[i],
                plan.sde_mask,
                self.schedule.eta_inside,
                self.schedule.eta_outside,
                noise,
            )
        return step_to(x0, eps, steps.alpha_next[i])

    @torch.no_grad()
    def bring(self, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Step i's latent z (noisier than the level) brought to the level by deterministic DDIM
        steps along `level_path`: the first with the step's own noise `eps`, each further one
        with a plain conditional UNet pass (no bank, no image prompt, no CFG)."""
        steps = level_path(i, self.level, self.plan.feature_substeps)
        path = [(self.steps.timesteps[k], self.steps.alpha[k]) for k in steps]
        z, passes = walk(self.unet, z, path, self.cond, eps)
        self.counts.bring += passes * z.shape[0]
        return z

    def rollback(self, i: int, z_next: torch.Tensor) -> torch.Tensor:
        """Time travel: one deterministic inversion step from step i's output back to its input
        level, with the plain conditional UNet (no bank, no image prompt, no CFG)."""
        t_next = self.steps.timesteps[i] - self.steps.ratio
        eps = self.unet(z_next, t_next, encoder_hidden_states=self.cond).sample
        self.counts.rollback += z_next.shape[0]
        return invert_step(z_next, eps, self.steps.alpha_next[i], self.steps.alpha[i])

    def blend(self, i: int, z: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        """Step i's output z with the inversion's latent at the next noise level where `outside`
        is 1 (after the last step: the encoded input, z_0)."""
        return outside * self.inversion.at_step(i + 1)[:1] + (1 - outside) * z

    def require_finite(self, i: int, z: torch.Tensor) -> None:
        """Stop where the latent leaves the finite numbers (a NaN spreads to every later step
        and decodes to a black image): SamplingDiverged naming the step and the scales."""
        if bool(torch.isfinite(z).all()):
            return
        plan = self.plan
        scales = [f"guidance_scale (now {plan.guidance_scale:g})", "the image prompt's scale"]
        if plan.energy_scale > 0:
            scales.insert(0, f"energy_scale (now {plan.energy_scale:g})")
        raise SamplingDiverged(
            f"the {plan.edit} diverged at step {i + 1} of {len(self.steps)}: its latent holds "
            f"NaN or infinite values. Lower {', '.join(scales[:-1])} or {scales[-1]}; in "
            "float16, try float32"
        )

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        z = self.plan.z_init
        blended = self.plan.blend_steps(len(self.steps))
        outside = None if not blended else 1 - grow(self.plan.sde_mask.to(z.dtype), 1)
        self.bank.store = self.inversion.memory
        self.bank.composite_masks = self.plan.composite_masks
        guided_edit = self.plan.energy_scale > 0
        try:
            for i in range(len(self.steps)):
                guided = guided_edit and i in self.schedule.guided
                reference = self.reference_features(i) if guided else None
                runs = self.schedule.runs(i, guided_edit)
                for run in range(runs):
                    z_next = self.step(i, z, reference)
                    # No rollback after the last run: upstream computed and discarded one.
                    if run < runs - 1:
                        z = self.rollback(i, z_next)
                z = z_next
                if self.plan.statistics is not None and i >= self.plan.statistics.first_step:
                    z = self.plan.statistics.apply(z, self.inversion.at_step(i + 1))
                if outside is not None and i < blended:  # last: nothing outside may move
                    z = self.blend(i, z, outside)
                self.require_finite(i, z)
                if self.callback is not None:
                    self.callback({"i": i, "z": z, "guided": guided, "runs": runs})
        finally:
            self.bank.mode = BankMode.OFF
            self.bank.composite_masks = None
        return z
