"""The research agent: an autoresearch loop whose experiment history is working memory.

A workspace is a git repository made from a template (`prepare.py` fixed, `train.py`
edited, `program.md` the rules). Each experiment proposes an edit of `train.py`, commits
it, runs it for a fixed time budget, logs a row to `results.tsv`, and keeps the commit
only if validation bits per byte beat the best by more than the measured noise margin.

Modules, in the order the loop uses them:
    workspace  -- templates, git helpers
    proposers  -- mutate (offline), openai:MODEL, policy:MODEL_DIR
    runner     -- runs train.py with a hard kill, parses its summary
    results    -- results.tsv / context.tsv appends, state.json, the keep rule
    history    -- experiment records in a WorkingMemory, context building and pruning
    loop       -- the loop itself, with resume
    plots      -- progress.png and context.png
    cli        -- `memact research init|run|plot`
"""
