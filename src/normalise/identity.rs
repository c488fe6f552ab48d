//! Norwegian person identifiers: fødselsnummer (FNR), D-nummer (DNR) and felles hjelpenummer
//! (FHN), with the OIDs VKP/PMD use for `subject.identifier.system`.
//!
//! Rules (all 11 digits, two mod-11 check digits K1/K2 over the preceding digits):
//! - FNR: `DDMMYY` + 3 individual digits + K1 K2; `DD` 01-31, `MM` 01-12.
//! - DNR: as FNR but 4 is added to the first digit (day 41-71).
//! - FHN: first digit 8 or 9, the rest random; same check digits.
//! - Synthetic test numbers: month + 40 (NAV «Dolly»; the same form as enterprise-internal
//!   H-numbers, which must never leave the enterprise) or month + 80 (Skatteetaten Tenor /
//!   Test Norge). They are accepted only for tenants configured as test tenants.

pub const OID_FNR: &str = "urn:oid:2.16.578.1.12.4.1.4.1";
pub const OID_DNR: &str = "urn:oid:2.16.578.1.12.4.1.4.2";
pub const OID_FHN: &str = "urn:oid:2.16.578.1.12.4.1.4.3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Fnr,
    Dnr,
    Fhn,
}

impl IdKind {
    pub fn system(self) -> &'static str {
        match self {
            IdKind::Fnr => OID_FNR,
            IdKind::Dnr => OID_DNR,
            IdKind::Fhn => OID_FHN,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            IdKind::Fnr => "fødselsnummer",
            IdKind::Dnr => "D-nummer",
            IdKind::Fhn => "felles hjelpenummer",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonId {
    pub kind: IdKind,
    pub value: String,
    /// A synthetic test number (month + 40 or + 80).
    pub synthetic: bool,
}

const W1: [u32; 9] = [3, 7, 6, 1, 8, 9, 4, 5, 2];
const W2: [u32; 10] = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];

fn check_digit(digits: &[u32], weights: &[u32]) -> Option<u32> {
    let sum: u32 = digits.iter().zip(weights).map(|(d, w)| d * w).sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        k => Some(k),
    }
}

/// Both check digits for the first nine digits, if the number can have them.
pub fn check_digits(first9: &[u32]) -> Option<(u32, u32)> {
    let k1 = check_digit(first9, &W1)?;
    let mut ten = first9.to_vec();
    ten.push(k1);
    let k2 = check_digit(&ten, &W2)?;
    Some((k1, k2))
}

/// Classifies and validates an identifier. Spaces and dots inside the number are ignored
/// (vendors format them as `010190 12345`). `allow_synthetic` is the tenant's test flag.
pub fn parse_person_id(input: &str, allow_synthetic: bool) -> Result<PersonId, String> {
    let value: String = input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '.')
        .collect();
    if value.len() != 11 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{:?} is not an 11-digit fødselsnummer, D-nummer or felles hjelpenummer",
            mask(input)
        ));
    }
    let d: Vec<u32> = value.bytes().map(|b| u32::from(b - b'0')).collect();
    let Some((k1, k2)) = check_digits(&d[..9]) else {
        return Err(format!("{} has invalid check digits", mask(&value)));
    };
    if d[9] != k1 || d[10] != k2 {
        return Err(format!("{} has invalid check digits", mask(&value)));
    }
    if d[0] >= 8 {
        return Ok(PersonId {
            kind: IdKind::Fhn,
            value,
            synthetic: false,
        });
    }
    let (kind, day) = if d[0] >= 4 {
        (IdKind::Dnr, (d[0] - 4) * 10 + d[1])
    } else {
        (IdKind::Fnr, d[0] * 10 + d[1])
    };
    let raw_month = d[2] * 10 + d[3];
    let (month, synthetic) = match raw_month {
        1..=12 => (raw_month, false),
        41..=52 => (raw_month - 40, true),
        81..=92 => (raw_month - 80, true),
        _ => {
            return Err(format!(
                "{} is not a valid {}: month {raw_month:02} is impossible",
                mask(&value),
                kind.name()
            ));
        }
    };
    let max_day = match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > max_day {
        return Err(format!(
            "{} is not a valid {}: day {day:02} is impossible",
            mask(&value),
            kind.name()
        ));
    }
    if synthetic && !allow_synthetic {
        return Err(format!(
            "{} is a synthetic test {} and the tenant is not configured as a test tenant",
            mask(&value),
            kind.name()
        ));
    }
    Ok(PersonId {
        kind,
        value,
        synthetic,
    })
}

/// Error messages never echo a full national identity number: birth date part only.
pub fn mask(s: &str) -> String {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if t.chars().count() <= 6 {
        return t;
    }
    let head: String = t.chars().take(6).collect();
    format!("{head}*****")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a valid number from nine digits.
    fn complete(first9: &str) -> Option<String> {
        let d: Vec<u32> = first9.bytes().map(|b| u32::from(b - b'0')).collect();
        let (k1, k2) = check_digits(&d)?;
        Some(format!("{first9}{k1}{k2}"))
    }

    #[test]
    fn kinds_and_checks() {
        let fnr = complete("010190123")
            .or_else(|| complete("010190124"))
            .expect("fnr");
        assert_eq!(parse_person_id(&fnr, false).expect("ok").kind, IdKind::Fnr);
        let dnr = complete("410190123")
            .or_else(|| complete("410190124"))
            .expect("dnr");
        assert_eq!(parse_person_id(&dnr, false).expect("ok").kind, IdKind::Dnr);
        let fhn = complete("812345678")
            .or_else(|| complete("812345679"))
            .expect("fhn");
        assert_eq!(parse_person_id(&fhn, false).expect("ok").kind, IdKind::Fhn);
        let syn = complete("018190123")
            .or_else(|| complete("018190124"))
            .expect("syn");
        assert!(parse_person_id(&syn, false).is_err());
        let p = parse_person_id(&syn, true).expect("test tenant");
        assert!(p.synthetic);
        // One wrong check digit.
        let mut bad = fnr.clone().into_bytes();
        bad[10] = if bad[10] == b'9' { b'0' } else { bad[10] + 1 };
        let e = parse_person_id(&String::from_utf8(bad).expect("utf8"), true).expect_err("bad");
        assert!(e.contains("check digits") && !e.contains(&fnr[6..]), "{e}");
        assert!(parse_person_id("123", true).is_err());
        assert!(parse_person_id("0101901234x", true).is_err());
        // Spaces are tolerated.
        let spaced = format!("{} {}", &fnr[..6], &fnr[6..]);
        assert_eq!(parse_person_id(&spaced, false).expect("ok").value, fnr);
    }

    #[test]
    fn impossible_dates() {
        let n = complete("320190123")
            .or_else(|| complete("320190124"))
            .expect("n");
        assert!(parse_person_id(&n, true).expect_err("day").contains("day"));
        let n = complete("011390123")
            .or_else(|| complete("011390124"))
            .expect("n");
        assert!(
            parse_person_id(&n, true)
                .expect_err("month")
                .contains("month")
        );
    }
}
