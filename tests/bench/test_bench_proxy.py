"""bench/ble_proxy.py also runs in smpmgr's own environment, where the project is not
installed, so it states the ATT header size itself: it must be the protocol's."""

from bench import ble_proxy
from protocols.constants import ATT_HEADER_BYTES


def test_the_proxy_states_the_protocols_att_header() -> None:
    assert ble_proxy.ATT_HEADER_BYTES == ATT_HEADER_BYTES
