"""twistd plugin entry: ``twistd -n xguard``. The real code is in xguard.tap."""

from twisted.application.service import ServiceMaker

xguard = ServiceMaker(
    "xguard",
    "xguard.tap",
    "Guard daemon persisting Xen VMs' UEFI NVRAM and vTPM state",
    "xguard",
)
