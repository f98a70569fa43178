"""`nf1prov demo-data DIR`: write a synthetic dataset in the upstream layout."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo-data")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--patients", default=5, show_default=True, help="Patients (the first is NF0014_T1).")
@click.option("--sites", default=3, show_default=True, help="Well-sites per patient.")
@click.option("--slices", default=7, show_default=True, help="z-slices per stack.")
@click.option("--height", default=128, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
def command(directory: Path, patients: int, sites: int, slices: int, height: int, width: int,
            seed: int) -> None:
    """Write a synthetic NF1 organoid dataset in the upstream layout.

    Example: nf1prov demo-data demo-data --patients 5 --sites 3
    """
    from nf1prov.data.synthetic import PATIENT_NAMES, write_demo_dataset
    from nf1prov.errors import UserError

    if not 1 <= patients <= len(PATIENT_NAMES):
        raise UserError(f"--patients {patients}: choose 1 to {len(PATIENT_NAMES)}.")
    if not 1 <= sites <= 9:
        raise UserError(f"--sites {sites}: choose 1 to 9.")
    if slices < 1 or min(height, width) < 16:
        raise UserError("--slices must be >= 1 and --height/--width >= 16.")
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not empty: choose a new folder so no "
                        "existing data is overwritten.")
    written = write_demo_dataset(directory, patients=patients, sites=sites, slices=slices,
                                 height=height, width=width, seed=seed)
    total = sum(p.stat().st_size for p in written)
    click.echo(f"Wrote {len(written) // 2} fields of view ({patients} patients x {sites} sites, "
               f"{slices}x{height}x{width} uint16) to {directory}: {len(written)} TIFF files, "
               f"{total / 1e6:.1f} MB.")
    for path in written[:2]:
        click.echo(f"  {path}")
    click.echo("  ...")
