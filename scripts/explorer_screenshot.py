"""Screenshot of the graph explorer (docs/explorer.png in the README).

Serves DIR with ``mechscope serve``, opens GRAPH in headless chromium (Playwright, Debian's
/usr/bin/chromium), sets the influence slider, pins the given nodes, hovers one, and saves a PNG.

    .venv/bin/python scripts/explorer_screenshot.py graphs fact-michael-jordan-plays-the-sport-of.json \
        docs/explorer.png --threshold 0.5 --pin 3_1550_4 --hover 3_1550_4
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("graph", help="graph name inside DIRECTORY")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--threshold", type=float, default=None, help="influence slider value")
    parser.add_argument("--pin", nargs="*", default=[], help="node ids to click (pin)")
    parser.add_argument("--hover", default=None, help="node id whose card to show")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", default="1600x1000")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mechscope", "serve", args.directory, "--port", str(port)],
                              stdout=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/api/graphs", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        width, height = map(int, args.size.split("x"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{base}/?graph={args.graph}")
            page.wait_for_selector("#graph-svg .node")
            if args.threshold is not None:
                page.locator("#influence-slider").fill(str(args.threshold))
            for node_id in args.pin:
                page.locator(f'#graph-svg .node[data-node-id="{node_id}"]').click()
            if args.hover:
                page.locator(f'#graph-svg .node[data-node-id="{args.hover}"]').hover()
                page.wait_for_timeout(1000)  # the card's store section
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
