"""Verification against recorded texts, for tests that drive a session step by step."""


def accepted_runs(texts: dict, live: dict, rids: list, trees) -> list:
    """Each row's accepted run (its tree's accepted nodes, then the bonus token) read from
    its request's recorded text at the request's position. ``live``: request id ->
    ``(problem, position, ...)``; each position is advanced past its run here."""
    runs = []
    for rid, tree in zip(rids, trees):
        pid, pos, *rest = live[rid]
        k = tree.accept_length(texts[pid][pos: pos + len(tree) + 1])
        runs.append(texts[pid][pos: pos + k + 1])
        live[rid] = (pid, pos + k + 1, *rest)
    return runs
