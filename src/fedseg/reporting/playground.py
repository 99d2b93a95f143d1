"""The FL playground's drawing (notebooks/06_playground.ipynb): the dashboard a run redraws after every round, the
global model's slices over the rounds, and the control panel (ipywidgets) that starts a run.

It draws from what a round hands over (`fedseg.experiments.playground.RoundView`: the study's `fl_rounds.csv` and
`fl_dilution.csv` so far and one predicted slice per site) and knows nothing of how a run is made: the panel calls
the `start` function it is given (the notebook passes `playground.run`), so this module stays beside the experiments
layer, not above it.

- `dashboard_figure(view, title, note)`: per round, the global model's validation Dice per channel, each client's
  local model on its own channels, how far each channel's head moved in the global model against its owners'
  update (ratio and cosine, the owners' share dashed), and one slice per site of the global model's prediction.
- `slices_figure(views, rounds)`: the global model's prediction on each site's slice at a few rounds.
- `live(output)`: an `on_round` callback that redraws the dashboard in a notebook (a display handle, or an
  ipywidgets `Output`).
- `panel(start, presets, defaults, ...)`: the controls (sites, cases, shards, loss, aggregation, mu, rounds, local
  steps, learning rate, seed, presets) and a Run button.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from fedseg.data.labels import CHANNEL_INDEX, COLOURS, FOREGROUND, owned_channels
from fedseg.federated.sites import parse_client
from fedseg.reporting.figures import overlay, radiological

#: How each control of the panel is labelled, and what it means (the notebook's markdown says more).
LOSS_LABELS = {"dice_ce": "masked: unlabelled = unknown", "literal_dice_ce": "paper's: unlabelled = negative"}


def _style(channel: str) -> dict[str, Any]:
    return {"color": COLOURS[channel], "ls": "--" if channel.endswith("tumor") else "-"}


def global_panel(ax: plt.Axes, rounds: pd.DataFrame) -> None:
    """The global model's validation Dice per channel (each scored on its owners' validation cases)."""
    table = rounds[rounds["kind"] == "global"] if len(rounds) else rounds
    for channel in FOREGROUND:
        column = f"dice_{channel}"
        if len(table) and table[column].notna().any():
            ax.plot(table["round"], table[column], marker="o", ms=3, label=channel.replace("_", " "),
                    **_style(channel))
    ax.set(title="global model (server): validation Dice", xlabel="round", ylabel="Dice", ylim=(-0.02, 1))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2, loc="upper left")


def local_panel(ax: plt.Axes, rounds: pd.DataFrame) -> None:
    """Each client's model after its local steps: validation Dice on the channels its dataset owns."""
    table = rounds[rounds["kind"] == "train"] if len(rounds) else rounds
    styles = ["-", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for client, rows in table.groupby("dataset", sort=False) if len(table) else ():
        dataset, shard, _ = parse_client(client)
        for channel in owned_channels(dataset):
            if rows[f"dice_{channel}"].notna().any():
                ax.plot(rows["round"], rows[f"dice_{channel}"], marker="o", ms=3, color=COLOURS[channel],
                        ls=styles[shard % len(styles)], label=f"{channel.replace('_', ' ')} @ {client}")
    ax.set(title="local models (clients): validation Dice, own channels", xlabel="round", ylim=(-0.02, 1))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2, loc="upper left")


def dilution_panels(ratio_ax: plt.Axes, cosine_ax: plt.Axes, dilution: pd.DataFrame, note: str | None) -> None:
    """How far each channel's output-layer row moved in the global model, as a fraction of its owners' update
    (the owners' share of cases dashed: FedAvg's dilution), and the cosine between the two (below 0: the other
    sites pull the head against its owners)."""
    if not len(dilution):
        for ax in (ratio_ax, cosine_ax):
            ax.text(0.5, 0.5, "dilution not measured\n" + textwrap.fill(note or "no round measured yet", 60),
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_axis_off()
        return
    for channel, rows in dilution.groupby("channel", sort=False):
        style = _style(channel)
        ratio_ax.plot(rows["round"], rows["ratio"], marker="o", ms=3, label=channel.replace("_", " "), **style)
        ratio_ax.axhline(rows["owner_share"].iloc[-1], color=style["color"], lw=0.8, ls=":", alpha=0.8)
        cosine_ax.plot(rows["round"], rows["cosine"], marker="o", ms=3, **style)
    top = max(1.1, float(np.nanmax(dilution["ratio"].to_numpy())) * 1.05)
    ratio_ax.set(title="head's move in the global model / owners' update\n(dotted: the owners' share of cases)",
                 xlabel="round", ylim=(0, top))
    cosine_ax.set(title="cosine between the head's move and the owners' update\n(below 0: the others pull against "
                  "it)", xlabel="round", ylim=(-1.05, 1.05))
    cosine_ax.axhline(0, color="k", lw=0.8)
    for ax in (ratio_ax, cosine_ax):
        ax.grid(alpha=0.3)


def slice_panel(ax: plt.Axes, dataset: str, part: Mapping[str, Any], title: str) -> None:
    """A site's validation slice with the global model's prediction (all channels, the paper's colours) and the
    site's own labels outlined in white."""
    overlay(ax, part["image"], part["prediction"], FOREGROUND)
    truth = np.zeros(part["label"].shape[1:], dtype=bool)
    for channel in owned_channels(dataset):
        truth |= part["label"][CHANNEL_INDEX[channel]]
    if truth.any():
        ax.contour(radiological(truth.astype(float)), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_title(title, fontsize=9)


def dashboard_figure(view: Any, title: str = "", note: str | None = None) -> plt.Figure:
    """The dashboard after one round (`RoundView`): Dice of the global and the local models, the dilution of each
    channel's head, one slice per site of the global model's prediction."""
    sites = list(view.slices)
    columns = max(4, len(sites))
    fig = plt.figure(figsize=(13, 9.4))
    grid = fig.add_gridspec(3, 2 * columns, height_ratios=[1, 1, 0.95], hspace=0.55, wspace=0.6,
                            left=0.05, right=0.99, top=0.93, bottom=0.01)
    half = columns
    charts = [fig.add_subplot(grid[r, c * half:(c + 1) * half]) for r in (0, 1) for c in (0, 1)]
    global_panel(charts[0], view.rounds)
    local_panel(charts[1], view.rounds)
    dilution_panels(charts[2], charts[3], view.dilution, note)
    for ax in charts:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    offset = (columns - len(sites))  # centre the slices when there are fewer than four sites
    top = 0.0
    for i, dataset in enumerate(sites):
        ax = fig.add_subplot(grid[2, offset + 2 * i:offset + 2 * i + 2])
        slice_panel(ax, dataset, view.slices[dataset], f"{dataset} ({view.slices[dataset]['case_id']})")
        top = max(top, ax.get_position().y1)
    fig.text(0.5, top + 0.035, "The global model's prediction on each site's validation slice (colours as in the "
             "Dice charts; white outline: the site's own labels)", ha="center", fontsize=9, weight="bold")
    fig.suptitle(f"{title} round {view.round} ({view.seconds:.0f} s)".strip(), fontsize=11)
    return fig


def slices_figure(views: Sequence[Any], rounds: Sequence[int] | None = None) -> plt.Figure:
    """The global model's prediction on each site's slice after a few rounds (default: first, middle, last)."""
    by_round = {v.round: v for v in views}
    order = sorted(by_round)
    rounds = list(rounds or dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))
    sites = list(by_round[order[-1]].slices)
    fig, axes = plt.subplots(len(sites), len(rounds), figsize=(2.6 * len(rounds), 2.6 * len(sites)), squeeze=False,
                             layout="constrained")
    for i, dataset in enumerate(sites):
        for j, number in enumerate(rounds):
            slice_panel(axes[i, j], dataset, by_round[number].slices[dataset], f"{dataset}, round {number}")
    return fig


def live(output: Any = None, title: str = "", note: Callable[[Any], str | None] | None = None
         ) -> Callable[[Any], None]:
    """An `on_round` callback that redraws the dashboard after every round: into `output` (an ipywidgets
    `Output`), else into one display in the notebook, updated in place (papermill keeps the last)."""
    from IPython.display import clear_output, display

    handle = None

    def on_round(view: Any) -> None:
        nonlocal handle
        fig = dashboard_figure(view, title, note(view) if note else None)
        if output is not None:
            with output:
                clear_output(wait=True)
                display(fig)
        elif handle is None:
            handle = display(fig, display_id=True)
        else:
            handle.update(fig)
        plt.close(fig)

    return on_round


# --------------------------------------------------------------------------------------------------
# The control panel
# --------------------------------------------------------------------------------------------------

def panel(start: Callable[[dict[str, Any], Callable[[Any], None]], Any], presets: Mapping[str, tuple[str, dict]],
          defaults: Mapping[str, Any], *, datasets: Sequence[str], losses: Sequence[str],
          aggregations: Sequence[str], max_cases: int, show: Callable[[Any], Any] | None = None,
          chosen_preset: str | None = None) -> Any:
    """The playground's controls and a Run button (ipywidgets).

    `start(values, on_round)` runs a federation with the chosen `values` (the fields of the playground's settings:
    sites, cases, shards, loss, method, mu, rounds, local_steps, lr, seed) and calls `on_round` after every round;
    the panel redraws its dashboard there, then shows `show(result)` (default: the result itself) below it.
    `presets`: name -> (question, values), chosen from a menu that fills the controls; `chosen_preset` is the one
    shown first (its values should be `defaults`)."""
    import ipywidgets as w
    from IPython.display import display

    chosen = {d: w.Checkbox(value=d in defaults["sites"], description=d, indent=False,
                            layout=w.Layout(width="100px")) for d in datasets}
    cases = {d: w.IntSlider(value=defaults["cases"].get(d, 3), min=1, max=max_cases, description="cases",
                            layout=w.Layout(width="260px")) for d in datasets}
    shards = {d: w.IntSlider(value=defaults["shards"].get(d, 1), min=1, max=max_cases, description="shards",
                             layout=w.Layout(width="260px")) for d in datasets}
    loss = w.ToggleButtons(options=[(LOSS_LABELS.get(x, x), x) for x in losses], value=defaults["loss"],
                           description="loss", style={"button_width": "230px"})
    method = w.ToggleButtons(options=list(aggregations), value=defaults["method"], description="aggregation")
    mu = w.FloatLogSlider(value=defaults["mu"], base=10, min=-4, max=0, step=0.25, description="mu (fedprox)",
                          readout_format=".4f", style={"description_width": "90px"})
    rounds = w.IntSlider(value=defaults["rounds"], min=1, max=30, description="rounds")
    local_steps = w.IntSlider(value=defaults["local_steps"], min=1, max=50, description="local steps")
    lr = w.FloatLogSlider(value=defaults["lr"], base=10, min=-4, max=-1, step=0.25, description="learning rate",
                          readout_format=".4f", style={"description_width": "90px"})
    seed = w.BoundedIntText(value=defaults["seed"], min=0, max=10**6, description="seed")
    preset = w.Dropdown(options=["(your own)", *presets], description="preset")
    question = w.HTML()
    button = w.Button(description="Run", button_style="primary", icon="play")
    status = w.Label("")
    dashboard, result = w.Output(), w.Output()

    def sync_shards(*_: Any) -> None:
        for d in datasets:
            shards[d].max = cases[d].value
            for control in (cases[d], shards[d]):
                control.disabled = not chosen[d].value
        mu.disabled = method.value != "fedprox"

    def values() -> dict[str, Any]:
        sites = tuple(d for d in datasets if chosen[d].value)
        return {"sites": sites, "cases": {d: cases[d].value for d in sites},
                "shards": {d: shards[d].value for d in sites if shards[d].value > 1}, "loss": loss.value,
                "method": method.value, "mu": float(mu.value), "rounds": rounds.value,
                "local_steps": local_steps.value, "lr": float(lr.value), "seed": int(seed.value)}

    def load(change: Any) -> None:
        if change["new"] not in presets:
            question.value = ""
            return
        text, given = presets[change["new"]]
        question.value = f"<b>Question.</b> {text}"
        for d in datasets:
            chosen[d].value = d in given["sites"]
            cases[d].value = given["cases"].get(d, cases[d].value)
            shards[d].value = given["shards"].get(d, 1)
        loss.value, method.value, mu.value = given["loss"], given["method"], given["mu"]
        rounds.value, local_steps.value, lr.value, seed.value = (given["rounds"], given["local_steps"], given["lr"],
                                                                 given["seed"])

    def run(_: Any) -> None:
        button.disabled = True
        result.clear_output()
        draw = live(dashboard, title=f"{method.value}, {loss.value}:")

        def on_round(view: Any) -> None:
            status.value = f"round {view.round} of {rounds.value} done ({view.seconds:.0f} s)"
            draw(view)

        status.value = "starting: the sites train one after the other ..."
        try:
            outcome = start(values(), on_round)
            with result:
                display(show(outcome) if show else outcome)
            status.value = f"finished: {status.value}"
        except Exception as error:  # noqa: BLE001 - shown to the student, not swallowed
            status.value = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            with result:
                print(f"{type(error).__name__}: {error}")
        finally:
            button.disabled = False

    for control in (*chosen.values(), *cases.values(), method):
        control.observe(sync_shards, names="value")
    preset.observe(load, names="value")
    button.on_click(run)
    if chosen_preset in presets:
        preset.value = chosen_preset
    sync_shards()
    site_rows = [w.HBox([chosen[d], cases[d], shards[d]]) for d in datasets]
    return w.VBox([
        w.HBox([preset, question]),
        w.HTML("<b>Sites</b> (a dataset each; its training cases; virtual clients it is split into)"),
        *site_rows, loss, w.HBox([method, mu]), w.HBox([rounds, local_steps]), w.HBox([lr, seed]),
        w.HBox([button, status]), dashboard, result,
    ])


def outcome_html(outcome: Any) -> Any:
    """A preset's outcome (`playground.Outcome`: question, verdict, answer, evidence) as HTML for a notebook."""
    from html import escape

    from IPython.display import HTML

    table = outcome.evidence.to_html(float_format=lambda x: f"{x:.3f}", border=0)
    return HTML(f"<p><b>Question.</b> {escape(outcome.question)}</p>"
                f"<p><b>Outcome, computed from the run: {escape(outcome.verdict)}.</b> {escape(outcome.answer)}</p>"
                f"{table}")
