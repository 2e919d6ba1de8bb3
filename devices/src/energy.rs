//! Device energy constants for the planner (issue 10; `specs/planner.md` §2).
//!
//! Every constant cites its published source. They are estimates for ranking candidates, not
//! a power meter: arithmetic energy is a lower bound (it leaves out DRAM traffic), radio
//! energy leaves out the LTE tail (paid once per burst, not per request).

/// Energy of one f32 multiply-add on the device, in picojoules: 3.7 pJ (32-bit float
/// multiply) + 0.9 pJ (32-bit float add), 45 nm, from M. Horowitz, "Computing's energy
/// problem (and what we can do about it)", ISSCC 2014, Fig. 1.1.9.
pub const F32_MAC_PJ: f64 = 3.7 + 0.9;

/// Energy of one 64-bit integer multiply-add as used by the HE encoder, in picojoules:
/// 32-bit integer multiply 3.1 pJ + add 0.1 pJ (Horowitz, ISSCC 2014), doubled for 64 bits
/// and doubled again for the modular reduction (an estimate, stated as such).
pub const U64_MODMAC_PJ: f64 = 4.0 * (3.1 + 0.1);

/// Active power of one big mobile CPU core running flat out, in milliwatts: 750 mW, Arm's
/// stated per-core power target for the Cortex-A76 at 3 GHz on 7 nm (the big core of 2019–20
/// flagship phones), as reported by A. Frumusanu, "Arm's Cortex-A76 CPU Unveiled: Taking Aim
/// at the Top for 7nm", AnandTech, 31 May 2018 (section "Performance & Power Projections").
/// A vendor target, not a measurement: the device's CPU energy for work that is timed
/// rather than counted (encryption, decryption, noise sampling) is `measured ms × this`.
pub const CPU_CORE_ACTIVE_MW: f64 = 750.0;

/// The radio a transfer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Radio {
    /// 802.11 Wi-Fi.
    Wifi,
    /// 4G/LTE.
    Lte,
}

/// Linear radio power model `P = α_u·t_u + α_d·t_d + β` (throughputs in Mbit/s, power in mW)
/// of J. Huang et al., "A Close Examination of Performance and Power Characteristics of 4G
/// LTE Networks", MobiSys 2012, Table 3 (measured on an HTC ThunderBolt).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RadioModel {
    /// α_u, mW per Mbit/s of uplink throughput (= mJ per Mbit sent).
    pub alpha_up_mw_per_mbps: f64,
    /// α_d, mW per Mbit/s of downlink throughput (= mJ per Mbit received).
    pub alpha_down_mw_per_mbps: f64,
    /// β, base power while the radio is active, mW.
    pub base_mw: f64,
}

/// LTE: α_u = 438.39, α_d = 51.97, β = 1288.04 (Huang et al., MobiSys 2012, Table 3).
pub const LTE: RadioModel = RadioModel {
    alpha_up_mw_per_mbps: 438.39,
    alpha_down_mw_per_mbps: 51.97,
    base_mw: 1288.04,
};

/// Wi-Fi: α_u = 283.17, α_d = 137.01, β = 132.86 (Huang et al., MobiSys 2012, Table 3).
pub const WIFI: RadioModel = RadioModel {
    alpha_up_mw_per_mbps: 283.17,
    alpha_down_mw_per_mbps: 137.01,
    base_mw: 132.86,
};

impl Radio {
    /// The power model of this radio.
    pub fn model(self) -> RadioModel {
        match self {
            Radio::Wifi => WIFI,
            Radio::Lte => LTE,
        }
    }

    /// Stable lower-case name (`wifi`, `lte`).
    pub fn name(self) -> &'static str {
        match self {
            Radio::Wifi => "wifi",
            Radio::Lte => "lte",
        }
    }
}

impl RadioModel {
    /// Energy in millijoules of sending `up` bytes, receiving `down` bytes, with the radio
    /// active for `active_ms` milliseconds in total.
    pub fn transfer_mj(&self, up: u64, down: u64, active_ms: f64) -> f64 {
        let mbit = |b: u64| b as f64 * 8.0 / 1e6;
        self.alpha_up_mw_per_mbps * mbit(up)
            + self.alpha_down_mw_per_mbps * mbit(down)
            + self.base_mw * active_ms.max(0.0) / 1e3
    }
}

/// Energy in millijoules of `macs` f32 multiply-adds.
pub fn compute_mj(macs: u64) -> f64 {
    macs as f64 * F32_MAC_PJ * 1e-9
}

/// Energy in millijoules of one CPU core busy for `ms` milliseconds at
/// [`CPU_CORE_ACTIVE_MW`] (non-finite or negative times count as 0).
pub fn cpu_mj(ms: f64) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        CPU_CORE_ACTIVE_MW * ms / 1e3
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lte_upload_costs_more_per_byte_than_wifi() {
        let lte = LTE.transfer_mj(1_000_000, 0, 0.0);
        let wifi = WIFI.transfer_mj(1_000_000, 0, 0.0);
        // 8 Mbit × 438.39 mJ/Mbit and × 283.17 mJ/Mbit.
        assert!((lte - 8.0 * 438.39).abs() < 1e-9);
        assert!((wifi - 8.0 * 283.17).abs() < 1e-9);
    }

    #[test]
    fn cpu_energy_is_time_times_power() {
        // 750 mW for 2 ms = 1.5 mJ.
        assert!((cpu_mj(2.0) - 2.0 * CPU_CORE_ACTIVE_MW / 1e3).abs() < 1e-12);
        assert_eq!(cpu_mj(f64::NAN), 0.0);
        assert_eq!(cpu_mj(-1.0), 0.0);
    }

    #[test]
    fn compute_energy_scales_with_macs() {
        assert!((compute_mj(1_000_000_000) - 4.6).abs() < 1e-9);
    }
}
