//! The early-exit cascade on the device (issue 10; `specs/planner.md` §7, TDM-EXIT-1).
//!
//! A bundle may carry a signed exit head ([`tandem_model::ExitHead`]): a dense layer on the
//! split activation with a calibrated threshold τ. When the app turns early exit on
//! ([`Device::set_early_exit`]; **off by default**: an app that does not ask gets the full
//! model's answer, which for [`Protection::Encrypted`] is exactly the plaintext reference,
//! and no answer changes without the app's consent), [`Device::answer`] evaluates the head
//! first and answers on the device when its confidence is at least τ — nothing is charged,
//! encrypted or sent — and otherwise offloads with [`Device::infer`]. The [`Answer`] says
//! which happened.
//!
//! [`Device::exit_confidence`] gives the head's verdict without acting on it (what the
//! planner prices the `Local` candidate with).

use std::time::Instant;

use tandem_model::ExitOutput;

use crate::{Device, DeviceError, Inference, Protection};

/// Whether [`Device::answer`] may answer with the bundle's exit head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyExit {
    /// Always offload (the default): answers are the full model's.
    #[default]
    Off,
    /// Answer locally when the head's confidence is at least the bundle's signed τ.
    On,
}

/// How one input was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The exit head was confident (confidence ≥ τ): answered on the device, nothing left it.
    Local {
        /// The head's class.
        class: usize,
        /// The head's confidence (largest softmax probability).
        confidence: f64,
        /// The head's logits.
        logits: Vec<f32>,
        /// Device time (device layers up to the split and the head), ms.
        device_ms: f64,
    },
    /// Offloaded through [`Device::infer`]: early exit is off, the bundle has no head, or the
    /// head was not confident enough.
    Offloaded {
        /// The head's confidence, if it was evaluated (early exit on and a head present).
        confidence: Option<f64>,
        /// The split inference.
        inference: Inference,
    },
}

impl Answer {
    /// The predicted class.
    pub fn class(&self) -> usize {
        match self {
            Answer::Local { class, .. } => *class,
            Answer::Offloaded { inference, .. } => inference.class,
        }
    }

    /// Whether the device answered on its own.
    pub fn is_local(&self) -> bool {
        matches!(self, Answer::Local { .. })
    }
}

impl Device {
    /// Turns the early-exit cascade on or off for [`Device::answer`] (default
    /// [`EarlyExit::Off`]).
    pub fn set_early_exit(&mut self, mode: EarlyExit) {
        self.early_exit = mode;
    }

    /// The early-exit setting.
    pub fn early_exit(&self) -> EarlyExit {
        self.early_exit
    }

    /// τ of the bundle's signed exit head (`None`: the bundle has no head).
    pub fn exit_threshold(&self) -> Option<f64> {
        self.bundle.exit_head().map(|h| h.threshold())
    }

    /// The exit head's verdict on a raw input — class, confidence, and whether it is at
    /// least τ — without sending anything (TDM-EXIT-1). `Ok(None)` if the bundle has no exit
    /// head. Independent of [`Device::set_early_exit`]: the planner asks it to know whether
    /// answering locally is a candidate for this request.
    ///
    /// # Errors
    /// [`DeviceError::Model`] for an input of the wrong length or with non-finite values.
    pub fn exit_confidence(&self, input: &[f32]) -> Result<Option<ExitOutput>, DeviceError> {
        Ok(self.bundle.exit_confidence(input)?)
    }

    /// Answers one input with the cascade (module docs): locally if early exit is on, the
    /// bundle has a head and its confidence is at least τ; otherwise
    /// [`Device::infer`]`(input, protection)`.
    ///
    /// With [`Protection::Auto`] the planner decides (TDM-PLAN-6): the exit head's verdict
    /// makes answering locally a candidate exactly when its confidence is at least τ (early
    /// exit on), and the plan picks among it and the offload candidates the policy allows;
    /// [`Device::last_plan`] shows the plan and which happened. The device learns the wall
    /// time of its local answers (head and plan included) for the `local` candidate's
    /// predicted latency.
    ///
    /// # Errors
    /// [`DeviceError::Model`] for a bad input (before anything is charged or sent);
    /// [`DeviceError::NoFeasiblePlan`] when `Auto` finds nothing feasible; otherwise as
    /// [`Device::infer`].
    pub async fn answer(
        &mut self,
        input: &[f32],
        protection: Protection,
    ) -> Result<Answer, DeviceError> {
        if protection == Protection::Auto {
            return self.answer_auto(input).await;
        }
        let mut confidence = None;
        if self.early_exit == EarlyExit::On {
            let start = Instant::now();
            if let Some(out) = self.bundle.exit_confidence(input)? {
                if out.exit {
                    return Ok(Answer::Local {
                        class: out.class,
                        confidence: out.confidence,
                        logits: out.logits,
                        device_ms: start.elapsed().as_secs_f64() * 1e3,
                    });
                }
                confidence = Some(out.confidence);
            }
        }
        let inference = self.infer(input, protection).await?;
        Ok(Answer::Offloaded {
            confidence,
            inference,
        })
    }

    async fn answer_auto(&mut self, input: &[f32]) -> Result<Answer, DeviceError> {
        let start = Instant::now();
        let verdict = self.exit_verdict(input)?;
        let confidence = verdict.as_ref().map(|(v, _)| v.confidence);
        match self.resolve_auto_with(verdict.as_ref().map(|(v, _)| *v), true)? {
            None => {
                // Chosen with a confident verdict, or because the app accepts the device
                // model's accuracy (then the head answers even with early exit off).
                let out = match verdict {
                    Some((_, out)) => out,
                    None => self
                        .bundle
                        .exit_confidence(input)?
                        .ok_or_else(|| DeviceError::NoFeasiblePlan(self.last_plan_text()))?,
                };
                let device_ms = start.elapsed().as_secs_f64() * 1e3;
                self.learn_local(device_ms);
                Ok(Answer::Local {
                    class: out.class,
                    confidence: out.confidence,
                    logits: out.logits,
                    device_ms,
                })
            }
            Some((p, cloud_ms)) => {
                let inference = Box::pin(self.infer(input, p)).await?;
                self.learn(&inference, cloud_ms);
                Ok(Answer::Offloaded {
                    confidence,
                    inference,
                })
            }
        }
    }

    fn last_plan_text(&self) -> String {
        self.last_plan()
            .map(crate::planner::Plan::explain)
            .unwrap_or_default()
    }
}
