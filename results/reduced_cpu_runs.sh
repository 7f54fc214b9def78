#!/usr/bin/env bash
# The reduced CPU runs behind the committed ablation, CAM and shortcut tables (results/README.md).
# Run from the repository root with the sources in $CXR_DATA_DIR:
#   bash results/reduced_cpu_runs.sh [all|ablation|shortcut]
# Finished runs whose recorded inputs match are reused, so a rerun after a change to the
# statistics only rewrites the tables.  About 2 hours on 2 CPU cores: the ablation part about
# 70 minutes (its ResNet50 rows are the slowest), the shortcut part about 95.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${CXR_DATA_DIR:?set CXR_DATA_DIR to the folder of the upstream sources (workbook download --to FOLDER)}
A=results/runs/ablation-cpu64
S=results/runs/shortcut-cpu64
TRAIN=(--preset smoke --set epochs=6 --set batch_size=16 --device cpu)
PART=${1:-all}
case "$PART" in all|ablation|shortcut) ;; *) echo "usage: bash $0 [all|ablation|shortcut]" >&2; exit 2;; esac

if [ "$PART" != shortcut ]; then

# The paper-protocol grid (CBAM, LGFNet, CLAHE, FPN): 100 images per class, seeds 0-2.
$PY -m nbhelpers curate --data-dir "$DATA" --out $A/data --per-class 100 --seed 0 > /dev/null
$PY -m nbhelpers grid --manifest $A/data/manifest.csv --data-dir "$DATA" --out $A --seeds 0 1 2 \
    --groups cbam lgfnet clahe fpn "${TRAIN[@]}" --tables results/tables --figures results/figures
$PY -m nbhelpers explain --grid-root $A --manifest $A/data/manifest.csv --data-dir "$DATA" \
    --groups cbam lgfnet clahe fpn --seeds 0 1 2 --out results/tables --figures results/figures
fi

if [ "$PART" != ablation ]; then
# The shortcut group: every ieee8023 class, 200 per class, seeds 0-2, and the probes' pool.
$PY -m nbhelpers curate --data-dir "$DATA" --out $S/data --per-class 200 --seed 0 --balance down --allow-ap \
    --all-classes-from ieee8023 > /dev/null
$PY -m nbhelpers curate --data-dir "$DATA" --out $S/pool --per-class 1000 --seed 0 --balance down --allow-ap \
    --all-classes-from ieee8023 > /dev/null
$PY -m nbhelpers grid --manifest $S/data/manifest.csv --data-dir "$DATA" --out $S --seeds 0 1 2 \
    --groups shortcut "${TRAIN[@]}" --tables results/tables --figures results/figures --prefix shortcut
$PY -m nbhelpers explain --grid-root $S --manifest $S/data/manifest.csv --data-dir "$DATA" --groups shortcut \
    --seeds 0 1 2 --out results/tables --figures results/figures --prefix shortcut_cam
# The field's shortcut tests: lungs blacked out (Maguolo & Nanni 2021) on the same set, one archive
# per class with the others external (DeGrave et al. 2021) on the pool, and the view probe.
$PY -m nbhelpers grid --manifest $S/data/manifest.csv --data-dir "$DATA" --out $S --seeds 0 1 2 \
    --groups blackout "${TRAIN[@]}"
$PY -m nbhelpers grid --manifest $S/pool/manifest.csv --data-dir "$DATA" --out $S --seeds 0 1 2 \
    --groups external "${TRAIN[@]}"
$PY -m nbhelpers shortcut --grid-root $S --manifest $S/data/manifest.csv --pool-manifest $S/pool/manifest.csv \
    --data-dir "$DATA" --seeds 0 1 2 --set epochs=6 --set batch_size=16 --device cpu \
    --cam-table results/tables/shortcut_cam_lung_energy.csv --blackout --external --view-probe --out results/tables
fi
# Every reading of these tables in results/README.md, written from their numbers.
$PY -m nbhelpers findings --tables results/tables --readme results/README.md
