//! The handover's failpoints, named after their step. Configured through
//! `FAILPOINTS` (or QMP `x-baton-failpoint` at run time):
//! `name=return` fails the step; `name=return(hold)` holds it, without
//! blocking a runtime worker, until the failpoint is removed, so a test can
//! kill a process, cut a link or cancel at exactly that step.

/// The failpoints holding a step right now (for tests: `query-migrate`
/// shows them as `x-baton-held`, so a test acts only once a step is reached).
static HELD: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// The failpoints holding a step now.
pub fn held() -> Vec<&'static str> {
    block::sync::lock(&HELD).clone()
}

/// A failure injected at a step.
#[derive(Debug, thiserror::Error)]
#[error("failpoint {0}")]
pub struct Injected(pub &'static str);

/// Pass the failpoint `name`.
pub async fn point(name: &'static str) -> Result<(), Injected> {
    #[cfg(feature = "failpoints")]
    {
        match fail::eval(name, |arg| arg.unwrap_or_default()) {
            None => Ok(()),
            Some(arg) if arg == "hold" => {
                tracing::info!(failpoint = name, "held");
                block::sync::lock(&HELD).push(name);
                while fail::list().iter().any(|(n, a)| n == name && a.contains("hold")) {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                block::sync::lock(&HELD).retain(|n| *n != name);
                tracing::info!(failpoint = name, "released");
                Ok(())
            }
            Some(_) => Err(Injected(name)),
        }
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        Ok(())
    }
}
