"""The four fine-tuning recipes, as data, and recipes of your own from a TOML file.

Torch-free on purpose: the launcher (`recipe_runner`) reads this table to plan jobs
without loading any ML library. Print the table with `python -m src.recipes [FILE.toml]`.

A recipe names which parts of Qwen2-VL train and how:
  * ``train_vision``  -- the ViT blocks of the vision tower: "frozen", "lora" or "full"
  * ``train_merger``  -- the patch merger that projects vision features into the LLM: "frozen", "lora", "full"
  * ``train_llm``     -- the language model: "frozen" or "lora"
  * ``train_lm_head`` -- the output projection: "frozen" or "full"
"full" trains the part's own weights (PEFT `modules_to_save`: a trainable copy saved with the
adapter). The Conv3d patch embedding never trains (LoRA does not support Conv3d and it is the
most generic part of the tower). A recipe with ``stages`` is a chain: each stage runs in turn
in one process on the same device, the next starting from the previous one's merged weights.

`use_recipes_file(path)` adds the recipes of a TOML file (same field names; `src/recipes.toml`
writes the four built-ins that way) to `RECIPES`, after checking every field of every recipe.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

PART_MODES = ("frozen", "lora", "full")
# The recipe field that says how each part trains, in the order recipes list them.
PART_FIELDS = {
    "vision": "train_vision",
    "merger": "train_merger",
    "llm": "train_llm",
    "lm_head": "train_lm_head",
}


@dataclass(frozen=True)
class TrainingRecipe:
    """One way of fine-tuning. Fields carry the user's plan's names."""

    name: str
    description: str
    quantized: bool  # load the LLM in 4-bit nf4 (QLoRA); the vision tower stays bf16
    train_vision: str  # "frozen" | "lora" | "full"
    train_llm: str  # "frozen" | "lora"
    train_merger: str = "frozen"  # "frozen" | "lora" | "full"
    # Short module names to wrap with LoRA; None = the family's defaults for the parts
    # that train. Either way they are scoped by module path (see src/models/lora.py).
    lora_target_modules: tuple[str, ...] | None = None
    learning_rate: float = 2e-4
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    stages: tuple[TrainingRecipe, ...] = ()
    train_lm_head: str = "frozen"  # "frozen" | "full"

    @property
    def is_chain(self) -> bool:
        return bool(self.stages)

    def modes(self) -> dict[str, str]:
        """{part: mode} of the parts this stage trains ("lora" or "full"), in PART_FIELDS order."""
        return {
            part: getattr(self, key) for part, key in PART_FIELDS.items() if getattr(self, key) != "frozen"
        }

    def trains(self) -> list[str]:
        """Human names of the parts this recipe (or its stages) trains."""
        parts: list[str] = []
        for step in self.stages or (self,):
            parts += [part for part in step.modes() if part not in parts]
        return parts

    def how(self) -> str:
        """What trains and how, e.g. 'llm=lora merger=full'; a chain's stages joined by ' -> '."""
        return " -> ".join(
            " ".join(f"{part}={mode}" for part, mode in step.modes().items())
            for step in self.stages or (self,)
        )

    def problems(self) -> list[str]:
        """Every way this recipe is malformed; empty when it is fine."""
        found = []
        for field in PART_FIELDS.values():
            if getattr(self, field) not in PART_MODES:
                found.append(f"{self.name}: {field}={getattr(self, field)!r}, expected one of {PART_MODES}")
        found += self._mode_problems()
        if not self.stages and self.trains() == []:
            found.append(
                f"{self.name}: trains nothing; set train_vision, train_merger, train_llm or train_lm_head "
                "to 'lora' or 'full'"
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

    def _mode_problems(self) -> list[str]:
        """Modes a part accepts but this setup cannot train (each with the fix)."""
        found = []
        if self.train_llm == "full":
            why = (
                "its 4-bit weights (quantized = true) cannot train"
                if self.quantized
                else "PEFT would keep a second, trainable copy of the whole LLM plus its gradients and AdamW "
                "states (about 5x the LLM's weights)"
            )
            found.append(f"{self.name}: train_llm='full' is not supported: {why}; use train_llm = 'lora'")
        if self.train_lm_head == "lora":
            found.append(
                f"{self.name}: train_lm_head='lora' is not supported: TRL computes the loss from lm_head's "
                "weight directly, so an adapter there never trains; use train_lm_head = 'full' or 'frozen'"
            )
        if not found and not self.stages and self.trains() and "lora" not in self.modes().values():
            found.append(
                f"{self.name}: no part trains with LoRA, and PEFT needs at least one LoRA part to wrap the "
                "model; set one of train_vision, train_merger, train_llm to 'lora'"
            )
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
BUILT_IN = tuple(RECIPES)  # a recipes file adds to these, never replaces one
SHIPPED_FILE = Path(__file__).with_name("recipes.toml")  # the built-ins in the file schema (a test compares)
RECIPE_SOURCES: dict[str, Path] = {}  # key of a recipe added from a file -> that file


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
    changes: dict[str, Any] = {LORA_FIELDS[key]: value for key, value in sizes.items() if value is not None}
    if not changes:
        return recipe
    stages = tuple(replace(stage, **changes) for stage in recipe.stages)
    return replace(recipe, **changes, stages=stages)


def lora_sizes(recipe: TrainingRecipe) -> dict[str, float]:
    """{"rank", "alpha", "dropout"} of a recipe (of its first stage for a chain), for logs and reports."""
    first = (recipe.stages or (recipe,))[0]
    return {key: getattr(first, field) for key, field in LORA_FIELDS.items()}


# --- recipes from a TOML file ------------------------------------------------------------------------
# One table per recipe, named by its header; keys are TrainingRecipe's fields. A table (or a stage) may
# start `from` another recipe and override fields:
#     [r5-llm-merger]
#     description = "LoRA on the LLM, the merger trained fully"
#     from = "r4-joint"
#     train_vision = "frozen"
#     train_merger = "full"
# A chain lists its stages as an array of tables, each with a `name`; only `description` sits beside them.

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # a recipe's name is a directory name too
ALIAS_PATTERN = re.compile(r"(r\d+)-")  # r5-llm-merger gets the alias r5, as the built-ins do
REQUIRED = tuple(f.name for f in fields(TrainingRecipe) if f.default is MISSING and f.name != "name")
CHAIN_KEYS = ("description", "stages")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each key takes in the file: (check, the words for it in a message).
FIELD_TYPES = {
    "description": (lambda v: isinstance(v, str), 'a string, e.g. "LoRA on the LLM"'),
    "quantized": (lambda v: isinstance(v, bool), "true or false"),
    **{key: (lambda v: isinstance(v, str), f"one of {PART_MODES} in quotes") for key in PART_FIELDS.values()},
    "learning_rate": (_is_number, "a number, e.g. 1e-4"),
    "lora_rank": (_is_whole, "a whole number, e.g. 16"),
    "lora_alpha": (_is_whole, "a whole number, e.g. 32"),
    "lora_dropout": (_is_number, "a number in [0, 1), e.g. 0.05"),
    "lora_target_modules": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        'a list of module names, e.g. ["q_proj", "v_proj"]',
    ),
    "stages": (
        lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
        'an array of tables, e.g. [{ from = "r2-vision-only", name = "stage1" }, ...]',
    ),
    "from": (lambda v: isinstance(v, str), 'the name of a recipe in quotes, e.g. "r4-joint"'),
    "name": (lambda v: isinstance(v, str), 'a name in quotes, e.g. "stage1-vision"'),
}


class RecipeFileError(ValueError):
    """Every problem of a recipes file, one line each (file, recipe, field, fix)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def alias_of(key: str) -> str | None:
    match = ALIAS_PATTERN.match(key)
    return match.group(1) if match else None


def use_recipes_file(path: str | Path) -> list[str]:
    """Check the recipes of a TOML file and add them to RECIPES (and their rN aliases to ALIASES).

    Returns their keys in file order; RecipeFileError (nothing added) when any field is wrong. Loading
    the same file again is a no-op, so the launcher and its workers can each call it.
    """
    path = Path(path).resolve()
    recipes = read_recipes_file(path)
    for recipe in recipes:
        RECIPES[recipe.name] = recipe
        RECIPE_SOURCES[recipe.name] = path
        if alias := alias_of(recipe.name):
            ALIASES[alias] = recipe.name
    return [recipe.name for recipe in recipes]


def recipes_file_problems(path: str | Path) -> list[str]:
    """use_recipes_file, its problems returned instead of raised: empty when the recipes were added."""
    try:
        use_recipes_file(path)
    except RecipeFileError as error:
        return error.problems
    return []


def forget_recipe_files() -> None:
    """Back to the built-in recipes only (tests use it to undo use_recipes_file)."""
    for key in RECIPE_SOURCES:
        RECIPES.pop(key, None)
    for alias in [alias for alias, key in ALIASES.items() if key in RECIPE_SOURCES]:
        del ALIASES[alias]
    RECIPE_SOURCES.clear()


def read_recipes_file(
    path: str | Path, registry: dict[str, TrainingRecipe] | None = None
) -> list[TrainingRecipe]:
    """The recipes of a TOML file, checked; RecipeFileError with every problem otherwise.

    `registry` holds the recipes the file may start `from` and must not rename (default: RECIPES,
    less what this same file added before). `read_recipes_file(SHIPPED_FILE, {})` reads the built-ins.
    """
    path = Path(path)
    if registry is None:
        registry = {k: r for k, r in RECIPES.items() if RECIPE_SOURCES.get(k) != path.resolve()}
    try:
        tables = tomllib.loads(path.read_text())
    except OSError as error:
        raise RecipeFileError(
            [f"{path}: cannot read it ({error.strerror}); pass a TOML recipes file"]
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeFileError([f"{path}: not valid TOML ({error}); fix the syntax there"]) from None
    if not tables:
        raise RecipeFileError([f"{path}: defines no recipe; add a table like [r5-mine] (see README.md)"])
    known, problems, recipes = dict(registry), [], []
    for name, table in tables.items():
        where = f"{path}: recipe {name}"
        found = _name_problems(name, table, registry, where)
        recipe = None if found else _read_table(table, name, known, where, found)
        problems += found
        if recipe is not None:
            known[name] = recipe
            recipes.append(recipe)
    if problems:
        raise RecipeFileError(problems)
    return recipes


def _name_problems(name: str, table, registry: dict[str, TrainingRecipe], where: str) -> list[str]:
    if not isinstance(table, dict):
        return [f"{where}: a top-level key is a recipe; write it as a table, [{name}], with its fields below"]
    if not NAME_PATTERN.match(name) or name == "all":
        return [f"{where}: bad name; use letters, digits, '.', '_' and '-' (not 'all'), like [r5-mine]"]
    aliases = {alias_of(key): key for key in registry} | {a: k for a, k in ALIASES.items() if k in registry}
    if name in registry or name in aliases:
        taken = registry.get(name) or registry[aliases[name]]
        return [f"{where}: the name is taken by the recipe {taken.name}; rename the table, e.g. [r5-mine]"]
    if (alias := alias_of(name)) and alias in aliases:
        return [
            f"{where}: its alias {alias} (the part before '-') is taken by {aliases[alias]}; pick an unused "
            "number, e.g. [r9-" + name.split("-", 1)[1] + "]"
        ]
    return []


def _read_table(
    table: dict, name: str, known: dict, where: str, problems: list[str], is_stage: bool = False
) -> TrainingRecipe | None:
    """One recipe (or one stage of a chain) from its table; None after a problem (added to `problems`)."""
    allowed = {*FIELD_TYPES} - ({"stages"} if is_stage else {"name"})
    start = len(problems)
    for key, value in table.items():
        if key not in allowed:
            problems.append(f"{where}: {key}: {_unknown_key(key, is_stage)}")
        elif not FIELD_TYPES[key][0](value):
            problems.append(f"{where}: {key} = {value!r}: expected {FIELD_TYPES[key][1]}")
    if len(problems) > start:
        return None
    if "stages" in table:
        return _read_chain(table, name, known, where, problems)
    base = _start_from(table, known, where, problems)
    if base is None:
        return None
    values = {**base, **{k: v for k, v in table.items() if k not in ("from", "name")}, "name": name}
    if "lora_target_modules" in table:
        values["lora_target_modules"] = tuple(table["lora_target_modules"])
    recipe = TrainingRecipe(**values)
    problems += [f"{where}: {problem.split(': ', 1)[1]}" for problem in recipe.problems()]
    return recipe if len(problems) == start else None


def _unknown_key(key: str, is_stage: bool) -> str:
    if key == "stages":
        return "a stage cannot have stages of its own (chains do not nest); list every stage in the chain"
    if key == "name":
        return "a recipe is named by its table header; drop this key (stages take a name)"
    import difflib

    close = difflib.get_close_matches(key, list(FIELD_TYPES), n=1)
    hint = f"did you mean {close[0]}?" if close else "remove it"
    return f"not a recipe field ({hint}); fields: {', '.join(k for k in FIELD_TYPES if k != 'name')}"


def _start_from(table: dict, known: dict, where: str, problems: list[str]) -> dict | None:
    """The fields a table starts from: its `from` recipe's, or none (then the required ones must be there)."""
    if "from" not in table:
        missing = [key for key in REQUIRED if key not in table]
        if missing:
            problems.append(
                f'{where}: missing {", ".join(missing)}; set them, or start from a recipe: from = "r4-joint"'
            )
            return None
        return {}
    origin = known.get(ALIASES.get(table["from"], table["from"])) or known.get(table["from"])
    if origin is None:
        problems.append(
            f"{where}: from = {table['from']!r}: no such recipe; name one defined above it or built in "
            f"({', '.join(known)})"
        )
        return None
    if origin.stages:
        problems.append(
            f"{where}: from = {table['from']!r} is a chain, and chains do not nest; start from one of its "
            f"stages' recipes instead"
        )
        return None
    return {f.name: getattr(origin, f.name) for f in fields(TrainingRecipe)}


def _read_chain(
    table: dict, name: str, known: dict, where: str, problems: list[str]
) -> TrainingRecipe | None:
    """A chain: its description and stages; what it trains is what its stages do."""
    start = len(problems)
    for key in table:
        if key not in CHAIN_KEYS:
            problems.append(
                f"{where}: {key}: a chain's settings are its stages'; move {key} into the stages that need it"
            )
    if "description" not in table:
        problems.append(f'{where}: missing description; add description = "what the chain does"')
    if not table["stages"]:
        problems.append(f"{where}: stages is empty; list at least one stage, or drop stages")
    stages = []
    for index, stage_table in enumerate(table["stages"], 1):
        stage_where = f"{where}, stage {index}"
        stage_name = stage_table.get("name")
        if not (isinstance(stage_name, str) and NAME_PATTERN.match(stage_name)):
            problems.append(
                f"{stage_where}: {'missing name' if stage_name is None else f'name = {stage_name!r}'}: "
                "every stage needs a name of letters, digits, "
                f'".", "_" and "-" (it names its output folder), e.g. name = "stage{index}-vision"'
            )
            continue
        stage_where += f" ({stage_name})"
        stage = _read_table(stage_table, stage_name, known, stage_where, problems, is_stage=True)
        if stage is not None:
            stages.append(stage)
    names = [stage.name for stage in stages]
    if len(set(names)) < len(names):
        problems.append(f"{where}: stages: two stages share a name; give each its own (they name folders)")
    if len(problems) > start:
        return None
    return TrainingRecipe(
        name=name,
        description=table["description"],
        quantized=any(stage.quantized for stage in stages),
        stages=tuple(stages),
        **{key: _chain_mode(stages, key) for key in PART_FIELDS.values()},  # type: ignore[arg-type]
    )


def _chain_mode(stages: list[TrainingRecipe], key: str) -> str:
    """A chain's mode for a part: the strongest of its stages' ("full" over "lora" over "frozen")."""
    modes = {getattr(stage, key) for stage in stages}
    return next((mode for mode in reversed(PART_MODES) if mode in modes), "frozen")


def main(argv: list[str] | None = None) -> int:
    import sys

    for path in sys.argv[1:] if argv is None else argv:
        try:
            use_recipes_file(path)
        except RecipeFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    for key, recipe in RECIPES.items():
        alias = alias_of(key) or "-"
        print(f"{alias:3} {key:15} {recipe.how():34} {recipe.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
