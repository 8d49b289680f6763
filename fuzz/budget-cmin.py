#!/usr/bin/env python3
"""Greedy set cover over a libFuzzer merge control file, under a file-count and byte budget.

usage: budget-cmin.py CONTROL_FILE MAX_FILES MAX_BYTES [KEEP_REGEX] > chosen-files

`cargo fuzz cmin` keeps every file that adds a feature (edge or hit-count bucket), which for
these targets is thousands of files. This keeps a budget instead: files whose path matches
KEEP_REGEX first (hand-written seeds), then, greedily, the file that adds the most coverage
edges (COV lines), ties and leftovers broken by new features (FT lines), then by size, until
MAX_FILES or MAX_BYTES is reached or nothing adds anything. Prints the chosen paths, one a
line; a summary goes to stderr. The control file comes from a libFuzzer merge:
  TARGET_BINARY -merge=1 -merge_control_file=CONTROL_FILE EMPTY_DIR CORPUS_DIR...
"""
import os, re, sys

ctl, max_files, max_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keep = re.compile(sys.argv[4]) if len(sys.argv) > 4 else None
lines = open(ctl, encoding="utf-8", errors="replace").read().split("\n")
n = int(lines[0])
files = lines[2:2 + n]
cov, ft = {}, {}
for line in lines[2 + n:]:
    parts = line.split()
    if len(parts) < 2:
        continue
    if parts[0] == "COV":
        cov[int(parts[1])] = set(parts[2:])
    elif parts[0] == "FT":
        ft[int(parts[1])] = set(parts[2:])
size = {i: os.path.getsize(f) for i, f in enumerate(files)}
all_cov = set().union(*cov.values()) if cov else set()
all_ft = set().union(*ft.values()) if ft else set()
chosen, have_cov, have_ft, used = [], set(), set(), 0
candidates = set(range(n))
for i in range(n):
    if keep and keep.search(files[i]) and len(chosen) < max_files and used + size[i] <= max_bytes:
        candidates.discard(i)
        chosen.append(i)
        have_cov |= cov.get(i, set())
        have_ft |= ft.get(i, set())
        used += size[i]
while len(chosen) < max_files and candidates:
    best, best_key = None, None
    for i in candidates:
        if used + size[i] > max_bytes:
            continue
        key = (len(cov.get(i, set()) - have_cov), len(ft.get(i, set()) - have_ft), -size[i])
        if best_key is None or key > best_key:
            best, best_key = i, key
    if best is None or (best_key[0] == 0 and best_key[1] == 0):
        break
    candidates.discard(best)
    chosen.append(best)
    have_cov |= cov.get(best, set())
    have_ft |= ft.get(best, set())
    used += size[best]
for i in chosen:
    print(files[i])
print(f"chosen {len(chosen)} files, {used} bytes; edges {len(have_cov)}/{len(all_cov)}, "
      f"features {len(have_ft)}/{len(all_ft)} of {n} files", file=sys.stderr)
