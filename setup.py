"""xguard: a Twisted guard daemon persisting Xen VMs' UEFI and vTPM state."""

from setuptools import find_packages, setup

setup(
    name="xguard",
    version="0.1.0",
    description="Deprivileging guard for Xen VM state (UEFI NVRAM, vTPM) on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*", "bench"]) + ["twisted.plugins"],
    package_data={"xguard": ["py.typed", "upstream/schema/*.sql"]},
    include_package_data=True,
    install_requires=[
        "twisted>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "zope.interface>=6.0",
        # The cache modes are an explicit TypeMachine (needs automat >= 24.8).
        "automat>=24.8.0",
        # Domain sockets parse untrusted XML-RPC from guests' helpers.
        "defusedxml>=0.7.1",
        "attrs>=23.1.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            # Checks the simulator's wire format against the official SDK and
            # drives the varstored socket as a real XenAPI client would.
            "XenAPI>=23.0",
            "ruff>=0.5",
        ],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["xguard-ctl=xguard.control.ctl:main"]},
    zip_safe=False,
)
