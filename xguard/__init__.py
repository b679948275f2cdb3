"""xguard: persists Xen VMs' UEFI variables and vTPM state on behalf of the
deprivileged varstored and swtpm processes, one restricted socket per VM."""

__version__ = "0.1.0"
__all__ = ["__version__"]
