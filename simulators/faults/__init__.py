"""Faults for simulated devices: link, frame, device and sensor, each on a seeded schedule.

A :class:`FaultInjector` works on one device through the device's seams (see
:class:`~simulators.devices.device.SimulatedDevice`), without replacing any of its methods:
it wraps every link the device attaches in a :class:`FaultyLink` (a link wrapper), changes
the samples its firmware takes (a sample filter), answers commands it ignores (a command
interceptor), sets the firmware's clock (clock drift) and runs scheduled events
(disconnects, reboots, a battery that runs out) on the virtual clock through the device's
public power and battery methods. Faults can be added and removed while the device runs
(:mod:`simulators.control` does so over a socket), and injectors compose on one device.

Fault classes and kinds (parameters in :data:`FAULT_PARAMETERS`):

=======  ===============  ============================================================
class    kind             what happens
=======  ===============  ============================================================
link     drop             notifications lost, one at a time or ``burst`` in a row
link     latency          every notification arrives ``delay_s`` (+ jitter) later
link     disconnect       the link drops; the device stays out of range ``out_of_range_s``
link     mtu              a smaller ATT MTU: fewer samples per batch
frame    corrupt          bits flipped (on a framed link the CRC catches them; on BLE
                          the message type is damaged, see :func:`corrupt_message`)
frame    truncate         the end of a frame is cut off
frame    duplicate        a frame arrives twice
frame    reorder          a frame arrives after the one sent after it
device   brownout         power dips: RAM (the ring, the count) lost, boot after ``down_s``
device   reboot           the firmware restarts: it sends what it holds, then reboots; its
                          BOOT reports the old count (kept in retained RAM)
device   low_battery      the charge drops to ``percent``; empty ``empty_after_s`` later
device   stuck_sensor     the pressure reading freezes (firmware/ADC fault)
device   clock_drift      the device's clock runs ``ppm`` parts per million fast/slow
device   ignore_commands  the listed opcodes are acknowledged OK but not applied
sensor   noise            extra Gaussian noise of ``sigma`` (kPa, or °C for temperature)
sensor   drift            the reading drifts by ``per_s`` per second
sensor   saturation       the reading is clipped at ``max``
sensor   dropout          the sensor reads 0 (``rate``: chance per sample block)
=======  ===============  ============================================================

Every random choice of a fault comes from its own generator, seeded by the world seed,
the device index and the fault's position, so a seed replays a run exactly.
"""
