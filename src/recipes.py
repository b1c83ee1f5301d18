"""The four fine-tuning recipes, as data.

Torch-free on purpose: the launcher (`recipe_runner`) reads this table to plan jobs
without loading any ML library. Print the table with `python -m src.recipes`.

A recipe names which parts of Qwen2-VL train and how:
  * ``train_vision`` -- the ViT blocks of the vision tower: "frozen" or "lora"
  * ``train_merger`` -- the patch merger that projects vision features into the LLM: "frozen" or "lora"
  * ``train_llm``    -- the language model: "frozen" or "lora"
The Conv3d patch embedding never trains (LoRA does not support Conv3d and it is the
most generic part of the tower). A recipe with ``stages`` is a chain: each stage runs
in turn in one process on the same device, the next starting from the previous one's
merged weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PART_MODES = ("frozen", "lora")


@dataclass(frozen=True)
class TrainingRecipe:
    """One way of fine-tuning. Fields carry the user's plan's names."""

    name: str
    description: str
    quantized: bool  # load the LLM in 4-bit nf4 (QLoRA); the vision tower stays bf16
    train_vision: str  # "frozen" | "lora"
    train_llm: str  # "frozen" | "lora"
    train_merger: str = "frozen"  # "frozen" | "lora"
    # Short module names to wrap with LoRA; None = the family's defaults for the parts
    # that train. Either way they are scoped by module path (see src/models/lora.py).
    lora_target_modules: tuple[str, ...] | None = None
    learning_rate: float = 2e-4
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    stages: tuple[TrainingRecipe, ...] = ()

    @property
    def is_chain(self) -> bool:
        return bool(self.stages)

    def trains(self) -> list[str]:
        """Human names of the parts this recipe (or its stages) trains."""
        steps = self.stages or (self,)
        parts: list[str] = []
        for step in steps:
            for part, mode in (
                ("vision", step.train_vision),
                ("merger", step.train_merger),
                ("llm", step.train_llm),
            ):
                if mode != "frozen" and part not in parts:
                    parts.append(part)
        return parts

    def problems(self) -> list[str]:
        """Every way this recipe is malformed; empty when it is fine."""
        found = []
        for field in ("train_vision", "train_merger", "train_llm"):
            if getattr(self, field) not in PART_MODES:
                found.append(f"{self.name}: {field}={getattr(self, field)!r}, expected one of {PART_MODES}")
        if not self.stages and self.trains() == []:
            found.append(
                f"{self.name}: trains nothing; set train_vision, train_merger or train_llm to 'lora'"
            )
        if not 0 < self.learning_rate < 1:
            found.append(f"{self.name}: learning_rate={self.learning_rate} is outside (0, 1)")
        if self.lora_rank < 1 or self.lora_alpha < 1:
            found.append(f"{self.name}: lora_rank and lora_alpha must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            found.append(f"{self.name}: lora_dropout={self.lora_dropout} is outside [0, 1)")
        for stage in self.stages:
            if stage.stages:
                found.append(f"{self.name}: stage {stage.name} is itself a chain")
            found.extend(stage.problems())
        return found


# LLM-only: QLoRA on every attention and MLP projection of the language model. 4-bit
# keeps a 7B model under 10 GiB; the vision tower stays bf16 and frozen.
R1_LLM_ONLY = TrainingRecipe(
    name="r1-llm-only",
    description="QLoRA (nf4) on the LLM's attention and MLP; vision tower and merger frozen",
    quantized=True,
    train_vision="frozen",
    train_llm="lora",
    learning_rate=2e-4,
)

# Vision-only: LoRA on the ViT blocks and the merger, LLM frozen in bf16. Not quantized:
# the LLM's activations carry the vision gradient back, and 4-bit noise there hurts a
# small adapter; a lower rate because the tower's features are shared by every token.
R2_VISION_ONLY = TrainingRecipe(
    name="r2-vision-only",
    description="LoRA on the vision blocks and the merger (bf16); LLM frozen",
    quantized=False,
    train_vision="lora",
    train_merger="lora",
    train_llm="frozen",
    learning_rate=1e-4,
)

RECIPES: dict[str, TrainingRecipe] = {
    "r1-llm-only": R1_LLM_ONLY,
    "r2-vision-only": R2_VISION_ONLY,
    # Two-stage: first adapt the eyes (r2), merge that into the bf16 base, then adapt the
    # language (r1, quantized) on top of the adapted vision.
    "r3-two-stage": TrainingRecipe(
        name="r3-two-stage",
        description="stage 1: r2 (vision + merger, bf16), merged; stage 2: r1 (QLoRA on the LLM) on top",
        quantized=True,
        train_vision="lora",
        train_merger="lora",
        train_llm="lora",
        learning_rate=2e-4,
        stages=(
            replace(R2_VISION_ONLY, name="stage1-vision"),
            replace(R1_LLM_ONLY, name="stage2-llm"),
        ),
    ),
    # Joint: LoRA on vision, merger and LLM at once, bf16 (QLoRA on the LLM with a bf16
    # vision LoRA works too, but bf16 is the clean reference the others are judged against).
    "r4-joint": TrainingRecipe(
        name="r4-joint",
        description="LoRA on vision blocks, merger and LLM together (bf16)",
        quantized=False,
        train_vision="lora",
        train_merger="lora",
        train_llm="lora",
        learning_rate=1e-4,
    ),
}

ALIASES: dict[str, str] = {key.split("-", 1)[0]: key for key in RECIPES}  # r1 -> r1-llm-only, ...


def resolve_recipe(name: str) -> TrainingRecipe:
    """A recipe by key or alias; KeyError with the valid names otherwise."""
    key = ALIASES.get(name, name)
    if key not in RECIPES:
        valid = ", ".join([*RECIPES, *ALIASES])
        raise KeyError(f"unknown recipe {name!r}; choose from: {valid}")
    return RECIPES[key]


LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout"}


def with_lora(recipe: TrainingRecipe, **sizes: float | None) -> TrainingRecipe:
    """The recipe (and each of its stages) with LoRA `rank`, `alpha` or `dropout` replaced where given.

    `with_lora(r4, rank=64)` is r4 at rank 64 and its own alpha; check the result with `.problems()`.
    """
    changes = {LORA_FIELDS[key]: value for key, value in sizes.items() if value is not None}
    if not changes:
        return recipe
    stages = tuple(replace(stage, **changes) for stage in recipe.stages)
    return replace(recipe, **changes, stages=stages)


def lora_sizes(recipe: TrainingRecipe) -> dict[str, float]:
    """{"rank", "alpha", "dropout"} of a recipe (of its first stage for a chain), for logs and reports."""
    first = (recipe.stages or (recipe,))[0]
    return {key: getattr(first, field) for key, field in LORA_FIELDS.items()}


def main() -> None:
    for key, recipe in RECIPES.items():
        alias = key.split("-", 1)[0]
        print(f"{alias:3} {key:15} trains {'+'.join(recipe.trains()):18} {recipe.description}")


if __name__ == "__main__":
    main()
