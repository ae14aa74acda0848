"""Driving the Prefect UI's typed run form with Playwright (tests/test_stack.py). Selectors are the
Prefect 3.8 UI's schema-form classes; each step waits for what it needs, no fixed sleeps for results."""

from __future__ import annotations

import re

UUID = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")


def _prop(page, label: str):
    """The innermost form property whose label is ``label`` ("Force (Optional)", ...)."""
    header = page.locator(".schema-form-property__label", has_text=label)
    return page.locator(".schema-form-property").filter(has=header).last


def open_custom_run_form(page, prefect_url: str) -> None:
    page.goto(f"{prefect_url}/deployments", wait_until="networkidle")
    page.get_by_role("link", name="nightly").first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.locator(".schema-form-property__label", has_text="Force (Optional)").wait_for()


def _choose(page, label: str, option: str) -> None:
    control = _prop(page, label).locator(".p-select-button__control")
    control.click()
    control.press("ArrowDown")  # opens the options list
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def _set_text(page, label: str, value: str) -> None:
    prop = _prop(page, label)
    prop.get_by_role("button", name="str", exact=True).click()
    prop.locator("textarea, input[type=text]").first.fill(value)


def _set_bool(page, label: str, value: bool) -> None:
    prop = _prop(page, label)
    prop.get_by_role("button", name="bool", exact=True).click()
    switch = prop.get_by_role("switch")
    if (switch.get_attribute("aria-checked") == "true") != value:
        switch.click()


def submit_form(page, *, profile: str, force: str, promote: bool, config: str) -> str:
    """Fill the run form (config path, profile, a forced node, promotion on/off), submit; returns the
    new flow run's id from the page the UI opens."""
    _set_text(page, "Config Path (Optional)", config)
    _prop(page, "Profile (Optional)").get_by_role("button", name="str", exact=True).click()
    _choose(page, "Profile (Optional)", profile)
    _choose(page, "Force (Optional)", force)
    _set_bool(page, "Promote (Optional)", promote)
    run_name = page.locator(".p-label", has_text="Run Name").locator("input").first.input_value()
    page.get_by_role("button", name="Submit").click()
    # The UI returns to the deployment page, the new run listed by its name: open it.
    page.get_by_role("link", name=run_name, exact=True).first.click()
    page.wait_for_url(UUID, timeout=30_000)
    return UUID.search(page.url).group(1)


def read_report_artifact(page, prefect_url: str, flow_run_id: str) -> str:
    """Open the flow run's Artifacts tab, then the run report; returns the rendered text."""
    page.goto(f"{prefect_url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("dagtune-run-report", exact=True).first.click()
    page.get_by_role("heading", name="Fine-tuned vs base (test split)").wait_for(timeout=30_000)
    return page.locator("body").inner_text()
