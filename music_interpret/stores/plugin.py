"""Entry-point module of the built-in activation stores."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def mi_activation_stores() -> list[type]:
    from .netcdf import NetCDFStore

    return [NetCDFStore]
