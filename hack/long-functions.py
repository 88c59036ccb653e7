#!/usr/bin/env python3
"""Counts Rust functions longer than a threshold (default 100 lines), from `fn` to its closing
brace at the same indentation, and prints the longest ones.

    hack/long-functions.py [--over N] DIR...
"""
import argparse
import glob
import re

FN = re.compile(r'^(\s*)(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)')


def lengths(root):
    for path in glob.glob(root + '/**/*.rs', recursive=True):
        lines = open(path, encoding='utf-8').read().split('\n')
        for i, line in enumerate(lines):
            m = FN.match(line)
            if not m or line.rstrip().endswith(';'):
                continue
            indent, name = m.group(1), m.group(7)
            j = i
            while j < len(lines) and lines[j].rstrip() != indent + '}':
                j += 1
            yield j - i + 1, path, name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--over', type=int, default=100)
    ap.add_argument('--show', type=int, default=12)
    ap.add_argument('dirs', nargs='+')
    args = ap.parse_args()
    found = sorted((x for d in args.dirs for x in lengths(d)), reverse=True)
    over = [f for f in found if f[0] > args.over]
    longest = f'{found[0][2]} in {found[0][1]}, {found[0][0]} lines' if found else 'none'
    print(f'{len(over)} functions over {args.over} lines; longest: {longest}')
    for n, path, name in over[:args.show]:
        print(f'  {n:4}  {path}  {name}')


if __name__ == '__main__':
    main()
