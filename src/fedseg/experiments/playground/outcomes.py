"""Each preset's answer computed from its run (`outcome`, `JUDGES`, `head_table`), and the exercises whose answers
are computed from a run (`EXERCISES`, `check`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from fedseg.data.labels import FOREGROUND, owned_channels
from fedseg.experiments.playground.rounds import PlaygroundRun
from fedseg.experiments.playground.settings import FAILS_BELOW, PRESETS, Preset

# --------------------------------------------------------------------------------------------------
# Outcomes: each preset's answer, computed from the run
# --------------------------------------------------------------------------------------------------

def global_dice(rounds: pd.DataFrame) -> pd.DataFrame:
    """The global model's validation Dice per round and channel (the strategy's `global` rows)."""
    table = rounds[rounds["kind"] == "global"].set_index("round")
    return table[[f"dice_{c}" for c in FOREGROUND]].rename(columns=lambda c: c[5:])


def local_dice(rounds: pd.DataFrame) -> pd.DataFrame:
    """Each client's local model (after its local steps) per round: its owned channels' validation Dice."""
    table = rounds[rounds["kind"] == "train"]
    return table[["round", "dataset", *[f"dice_{c}" for c in FOREGROUND]]].rename(
        columns=lambda c: c[5:] if c.startswith("dice_") else c)


def head_table(run: PlaygroundRun) -> pd.DataFrame:
    """Per foreground channel of the federation: its owners and their share of the training cases; over the rounds,
    the mean ratio of the global head's move to the owners' update, its largest distance from the owners' share
    (`gap_to_share`: 0 under pure dilution), the mean cosine and the others' move over the owners'; and the last
    round's validation Dice of the global model and of its owners' local models."""
    sites_in = [c for c in FOREGROUND if any(c in owned_channels(d) for d in run.settings.sites)]
    last = int(run.rounds["round"].max())
    final_global = global_dice(run.rounds).loc[last]
    local = local_dice(run.rounds)
    local = local[local["round"] == last]
    rows = []
    for channel in sites_in:
        row = {"channel": channel, "owners": ",".join(d for d in run.settings.sites if channel in owned_channels(d)),
               "owner_share": run.owner_share[channel], "global_dice": float(final_global[channel]),
               "local_dice": float(local[channel].mean())}
        if len(run.dilution):
            moves = run.dilution[run.dilution["channel"] == channel]
            gap = (moves["ratio"] - moves["owner_share"]).abs().max()
            row.update(ratio=float(moves["ratio"].mean()), gap_to_share=float(gap),
                       cosine=float(moves["cosine"].mean()),
                       others_over_owner=float(moves["others_move"].mean() / moves["owner_move"].mean()))
        rows.append(row)
    return pd.DataFrame(rows).set_index("channel")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A preset's answer, computed from its run: a short verdict, the sentence that gives its numbers, and the
    table they come from (`head_table`)."""
    question: str
    verdict: str
    answer: str
    evidence: pd.DataFrame


#: How close two measured ratios must be to count as equal (the study's tests hold the masked-loss ratio to its
#: owner share to 1e-5; the mean over rounds of float32 weights stays well inside this).
SAME = 1e-4


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def judge_label_conflict(run: PlaygroundRun, channel: str = "liver") -> tuple[str, str]:
    heads = head_table(run)
    if channel not in heads.index:
        return "not asked", f"No site owns the {channel}: include its dataset."
    head = heads.loc[channel]
    local, glob = head["local_dice"], head["global_dice"]
    pull = (f" The other sites moved the {channel} head {head['others_over_owner']:.2f}x as far as its owners did, "
            f"and the global head's move points at cosine {head['cosine']:+.2f} to the owners' (1: same way)."
            if "cosine" in head else "")
    if not local >= FAILS_BELOW:
        return "inconclusive", (f"The {channel} site's own model did not learn the {channel} either (local Dice "
                                f"{_pct(local)}, below {_pct(FAILS_BELOW)}): give it more rounds or local steps."
                                + pull)
    if glob < FAILS_BELOW:
        return "collapsed", (f"The {channel} site's own model segments the {channel} (local Dice {_pct(local)}), the "
                             f"global model does not (Dice {_pct(glob)}, below the {_pct(FAILS_BELOW)} the study "
                             "calls failing)." + pull)
    return "kept", (f"The global model keeps the {channel} (Dice {_pct(glob)}; the {channel} site's own model "
                    f"{_pct(local)})." + pull)


def judge_dilution(run: PlaygroundRun) -> tuple[str, str]:
    heads = head_table(run)
    if "ratio" not in heads:
        return "not measured", run.dilution_note or "This federation measured no dilution."
    untouched = bool((heads["others_over_owner"] <= SAME).all())
    exact = bool((heads["gap_to_share"] <= SAME).all())
    parts = ", ".join(f"{c} {h['ratio']:.3f} (share {h['owner_share']:.3f})" for c, h in heads.iterrows()
                      if not c.endswith("tumor"))
    if untouched and exact:
        return "diluted", ("Every head moved by exactly its owners' share of the cases, never more: the other sites "
                           f"sent it back unchanged, and FedAvg averaged it with them. Ratio per organ: {parts}.")
    if not untouched:
        return "not pure dilution", ("The other sites moved the heads too (others' move / owners' up to "
                                     f"{heads['others_over_owner'].max():.2f}): that is label conflict on top. "
                                     f"Ratio per organ: {parts}.")
    return "other", f"The heads moved by other fractions than their owners' shares: {parts}."


def judge_ownerfedavg(run: PlaygroundRun) -> tuple[str, str]:
    heads = head_table(run)
    if "ratio" not in heads:
        return "not measured", run.dilution_note or "This federation measured no dilution."
    whole = bool(((heads["ratio"] - 1).abs() <= SAME).all() and ((heads["cosine"] - 1).abs() <= SAME).all())
    dice = ", ".join(f"{c} {_pct(h['global_dice'])} (owners' own {_pct(h['local_dice'])})"
                     for c, h in heads.iterrows() if not c.endswith("tumor"))
    if whole:
        return "removed", ("Every head moved by its owners' whole update (ratio 1.000, cosine 1.000), whatever their "
                           f"share of the cases. Global Dice after the last round: {dice}.")
    return "not removed", (f"Some head moved by another fraction of its owners' update (ratios "
                           f"{heads['ratio'].round(3).to_dict()}). Global Dice: {dice}.")


def judge_data_poor(run: PlaygroundRun) -> tuple[str, str]:
    heads = head_table(run)
    counts = {d: run.settings.training_cases(d) for d in run.settings.sites}
    poor = min(counts, key=counts.get)
    organs = [c for c in owned_channels(poor) if not c.endswith("tumor")]
    head = heads.loc[organs[0]]
    others = heads.drop(index=list(owned_channels(poor)))
    kept = (f"its head keeps {_pct(head['ratio'])} of each of its updates (its share of the cases: "
            f"{_pct(head['owner_share'])})" if "ratio" in head else f"its share of the cases is "
            f"{_pct(head['owner_share'])} ({run.dilution_note or 'dilution not measured'})")
    gap = head["local_dice"] - head["global_dice"]
    rest = others[~others.index.str.endswith("tumor")]
    rest_gap = float((rest["local_dice"] - rest["global_dice"]).mean()) if len(rest) else math.nan
    verdict = "left behind" if gap > rest_gap and head["global_dice"] < FAILS_BELOW else (
        "behind" if gap > rest_gap else "not behind")
    return verdict, (f"The {poor} site holds {counts[poor]} of {sum(counts.values())} training cases: {kept}. "
                     f"Its {organs[0]}: global Dice {_pct(head['global_dice'])} against its own model's "
                     f"{_pct(head['local_dice'])} (a gap of {_pct(gap)}); the other organs' mean gap "
                     f"{_pct(rest_gap)}.")


JUDGES: dict[str, Callable[[PlaygroundRun], tuple[str, str]]] = {
    "label_conflict": judge_label_conflict, "dilution": judge_dilution, "ownerfedavg": judge_ownerfedavg,
    "data_poor": judge_data_poor,
}


def outcome(run: PlaygroundRun, preset: str | Preset) -> Outcome:
    """The answer of `preset`'s question (a `PRESETS` name) from `run`'s numbers (`JUDGES`)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    verdict, answer = JUDGES[preset.judge](run)
    return Outcome(question=preset.question, verdict=verdict, answer=answer, evidence=head_table(run))


# --------------------------------------------------------------------------------------------------
# Exercises: a question, the run that answers it, and the answer computed from that run
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Exercise:
    question: str
    preset: str  #: the preset whose run answers it
    answer: Callable[[PlaygroundRun], Any]  #: computed from the run
    explain: Callable[[PlaygroundRun], str]
    tolerance: float | None = 0.01  #: for numbers; None: the answer is a name
    needs: tuple[str, ...] = ()  #: the datasets the run must include to answer it


def _mean_ratio(run: PlaygroundRun, channel: str) -> float:
    moves = run.dilution[run.dilution["channel"] == channel]
    return float(moves["ratio"].mean()) if len(moves) else math.nan


EXERCISES: dict[str, Exercise] = {
    "kidney_share": Exercise(
        "Dilution preset: by what fraction of the kits19 site's update does the global kidney head move each round? "
        "(a number between 0 and 1; hint: Eq. 1 of Shen et al. 2022 weighs each site by its training cases)",
        "dilution", lambda run: _mean_ratio(run, "kidney"),
        lambda run: (f"n_kits19 / n = {run.settings.training_cases('kits19')} / "
                     f"{sum(run.settings.training_cases(d) for d in run.settings.sites)} = "
                     f"{run.owner_share['kidney']:.4f}: the others send the kidney head back unchanged."),
        needs=("kits19",)),
    "poor_share": Exercise(
        "Data-poor preset: what fraction of the data-poor site's update of its organ's head reaches the global model?",
        "data_poor", lambda run: _mean_ratio(run, _poor_organ(run)),
        lambda run: f"Its share of the training cases, {run.owner_share[_poor_organ(run)]:.4f}: the same arithmetic, "
                    "a smaller n_k."),
    "owner_ratio": Exercise(
        "ownerfedavg preset: what is the ratio of the liver head's move in the global model to the liver site's own "
        "update?", "ownerfedavg", lambda run: _mean_ratio(run, "liver"),
        lambda run: "1: ownerfedavg averages the liver head over its owner alone, so its update is kept whole.",
        needs=("liver",)),
    "hardest_pull": Exercise(
        "Label-conflict preset: which organ's head do the other sites pull hardest against its owners (the lowest "
        "mean cosine)? (one of liver, spleen, pancreas, kidney)", "label_conflict",
        lambda run: str(head_table(run).drop(index=[c for c in FOREGROUND if c.endswith("tumor")],
                                              errors="ignore")["cosine"].idxmin()),
        lambda run: "The organ whose owners' push toward 'present' the others' 'absent' cancels most: "
                    + ", ".join(f"{c} {v:+.2f}" for c, v in head_table(run)["cosine"].items()
                                if not c.endswith("tumor")) + ".",
        tolerance=None),
}


def _poor_organ(run: PlaygroundRun) -> str:
    counts = {d: run.settings.training_cases(d) for d in run.settings.sites}
    return owned_channels(min(counts, key=counts.get))[0]


def check(name: str, runs: Mapping[str, PlaygroundRun], guess: Any = None) -> str:
    """Exercise `name`'s answer from `runs[its preset]`, and whether `guess` (None: no guess) matches it."""
    exercise = EXERCISES[name]
    run = runs.get(exercise.preset)
    if run is None:
        return f"Run the {exercise.preset!r} preset first: its run answers this."
    missing = [d for d in exercise.needs if d not in run.settings.sites]
    counts = {d: run.settings.training_cases(d) for d in run.settings.sites}
    if missing or len(counts) < 2 or (exercise.preset == "data_poor" and len(set(counts.values())) < 2):
        return (f"The {exercise.preset!r} run has sites {counts} (training cases): too few to answer this"
                f"{' (it needs ' + ', '.join(missing) + ')' if missing else ''}; run the preset with its own sites.")
    answer = exercise.answer(run)
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"The {exercise.preset!r} run measured no dilution ({run.dilution_note}): it cannot answer this."
    shown = f"{answer:.4f}" if isinstance(answer, float) else str(answer)
    text = f"The run's answer: {shown}. {exercise.explain(run)}"
    if guess is None:
        return text
    if exercise.tolerance is None:
        right = str(guess).strip().lower() == str(answer).lower()
    else:
        right = abs(float(guess) - float(answer)) <= exercise.tolerance
    return f"{'Right' if right else 'Not quite'}: you said {guess}. {text}"
