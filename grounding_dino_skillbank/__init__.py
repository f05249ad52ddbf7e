"""The skill bank's files as package data: skills/, schemas/, references/ and examples/.

Agents and people find these folders at the top of the repository, so they stay there; in a checkout the entries of
this package are links to them, and a wheel holds copies. Code reaches them through `sdk.skill_info.BANK_ROOT`, the
folder of this package, which is the same lookup from a checkout and from an installed wheel.
"""
