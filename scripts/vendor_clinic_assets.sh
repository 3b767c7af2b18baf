#!/usr/bin/env bash
# Rebuild the browser libraries of the clinic console from the npm registry.
#
# The console ships htmx and uPlot inside the Python package (no CDN at run time: a
# clinic may be offline). Versions are pinned in devicebridge/clinic/static/vendor/
# package.json and package-lock.json; this script installs exactly those with `npm ci`
# in a scratch folder and copies the built files and their licences next to them.
# The copies are committed; run this only to change a version (edit package.json,
# run `npm install --package-lock-only` there, then this script).
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=devicebridge/clinic/static/vendor
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp "$VENDOR/package.json" "$VENDOR/package-lock.json" "$WORK/"
(cd "$WORK" && npm ci --ignore-scripts --no-audit --no-fund --silent)
cp "$WORK/node_modules/htmx.org/dist/htmx.min.js" "$VENDOR/htmx.min.js"
cp "$WORK/node_modules/htmx.org/LICENSE" "$VENDOR/htmx.LICENSE"
cp "$WORK/node_modules/uplot/dist/uPlot.iife.min.js" "$VENDOR/uPlot.iife.min.js"
cp "$WORK/node_modules/uplot/dist/uPlot.min.css" "$VENDOR/uPlot.min.css"
cp "$WORK/node_modules/uplot/LICENSE" "$VENDOR/uPlot.LICENSE"
(cd "$VENDOR" && sha256sum htmx.min.js uPlot.iife.min.js uPlot.min.css > SHA256SUMS)
echo "vendored into $VENDOR:"
cat "$VENDOR/SHA256SUMS"
