"""The README's Recipes table is generated from recipes/*.yaml by the planner, not typed by hand."""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_recipes_table_matches_the_recipes():
    recipes = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"), "--readme-table", *recipes],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    readme = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- RECIPES-TABLE:BEGIN -->\n(.*?)\n<!-- RECIPES-TABLE:END -->", readme, re.S)
    assert m, "README.md lost its RECIPES-TABLE markers"
    assert m.group(1).strip() == out, (
        "README Recipes table is stale: regenerate with "
        "`python tools/plan_memory.py --readme-table recipes/*.yaml`")
    for path in recipes:  # every recipe has a row
        assert f"`{os.path.basename(path)[:-5]}`" in m.group(1)


def test_readme_states_the_two_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "make demo" in readme and "make test" in readme
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must call the README's test command"


def test_project_files_stand_alone():
    """The repository cites no machine path (e.g. a shared folder outside it): what it relies on
    lives in docs/."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    texts = {f: open(os.path.join(ROOT, f), errors="replace").read() for f in files
             if f.endswith((".py", ".md", ".yaml", ".toml", ".txt", "Makefile", ".json"))}
    needles = ("/" + "work/", ".." + "/shared")      # split so that this file does not match itself
    bad = [f for f, t in texts.items() if any(n in t for n in needles)]
    assert texts and bad == [], bad
