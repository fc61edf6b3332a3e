"""Data files for the tests of task sources (HotpotQA rows, memact's QA JSONL format)."""

import json


def hotpot_rows(n=40):
    rows = []
    for i in range(n):
        title_a, title_b = f"Town{i}", f"River{i}"
        rows.append({
            "_id": f"id{i}", "question": f"Which river flows through Town{i}?", "answer": f"Blue{i}",
            "type": "bridge", "level": "easy",
            "supporting_facts": [[title_a, 0], [title_b, 0]],
            "context": [[title_a, [f"Town{i} lies on the river Blue{i}.", " It has a mill."]],
                        [title_b, [f"The Blue{i} is a long river.", " It floods in spring."]]],
        })
    return rows


def qa_rows(n=40):
    return [{"id": f"q{i}", "question": f"Who built the tower of Ardel{i}?", "answer": f"Mason{i}",
             "aliases": [f"M{i}"], "supporting": [f"Ardel{i}"],
             "documents": [{"title": f"Ardel{i}", "text": f"The tower of Ardel{i} was built by Mason{i}."},
                           {"title": f"Other{i}", "text": "A town with a market."}]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
