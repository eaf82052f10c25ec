"""`python -m equip.leaderboard [latest|SWEEP_DIR|PARENT_RUN_ID]`: the command; the work is in
equip.sweep.leaderboard."""

from equip.sweep.leaderboard import main

if __name__ == "__main__":
    raise SystemExit(main())
